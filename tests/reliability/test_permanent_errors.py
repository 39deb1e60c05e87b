"""Scenario 7: permanent errors — 403 AccessDenied, a missing bucket, expired or invalid credentials, a
catalog that refuses our user — end in `failed` with the reason after ONE attempt, with no hot loop, other
entries unaffected; `mldash-syncd retry` delivers them once the cause is fixed.

A daemon runs as a service; after the failures settle it keeps running for HOLD seconds, and the proxy's
request log shows that nothing more was sent for the failed entries (no retry loop). The fix is made
(the proxy rule removed, the bucket created, the failpoint switched off), `mldash-syncd retry` runs as
the CLI a person would type, and the running daemon delivers — verified by the invariants.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pymongo
import pytest

from mldash.config import Settings
from mldash.spool.manifest import Manifest
from tests.backend_helpers import _s3
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes, settings_env
from tests.reliability.conftest import MIB
from tests.reliability.helpers import ServiceThread, all_in, entry_rows, wait_for
from tests.reliability.invariants import _pending_uploads, check_invariants

HOLD = 2.0
DONE = ("committed", "evicted")


def retry_cli(settings: Settings, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "mldash_syncd", "retry", *args], env=settings_env(settings),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


class S3ErrorRule:
    """Answer every S3 request with `error` — HEAD requests without a body, as S3 does (a body after a HEAD
    response would be read as the next response and garble the connection)."""

    def __init__(self, proxy: FaultProxy, error: H.S3Error) -> None:
        self.rules = [proxy.respond(H.http_response(error.status, b""), match=rb"\AHEAD "),
                      proxy.respond(error.response(H.next_request_id()), match=rb"\A(?!HEAD )")]

    @property
    def injected(self) -> int:
        return sum(rule.injected for rule in self.rules)

    def remove(self) -> None:
        for rule in self.rules:
            rule.remove()


def requests_for(proxy: FaultProxy, entry: Manifest) -> int:
    return sum(1 for m in proxy.messages if m.target and str(entry.id) in m.target)


def assert_failed_once(settings: Settings, entries: list[Manifest], *reasons: str) -> None:
    """Failed after one attempt, permanently, saying why (any of `reasons`: a HEAD error has no body, so
    only its status can be shown — as with S3)."""
    rows = entry_rows(settings)
    for entry in entries:
        row = rows[entry.id]
        assert row["state"] == "failed", f"{entry.filename}: {row['state']} ({row['last_error']})"
        assert row["attempts"] == 1, f"{entry.filename}: a permanent error was tried {row['attempts']} times"
        assert any(reason in (row["last_error"] or "") for reason in reasons), row["last_error"]
        assert row["error_kind"] == "permanent"


def test_access_denied_on_some_keys_fails_those_only(s3_via_proxy: tuple[Settings, Settings, FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    # 403 for everything that writes under a "forbidden" folder: a small object (PutObject) and the parts of a
    # big one (its CreateMultipartUpload passes: the denial comes mid-upload, the upload must be aborted).
    denied = H.ACCESS_DENIED.response(H.next_request_id())
    small_rule = proxy.respond(denied, match=rb"\APUT [^ ]*/forbidden/[^ ?]*(?: |\?(?![^ ]*partNumber))")
    part_rule = proxy.respond(denied, match=rb"\APUT [^ ]*/forbidden/[^ ]*partNumber=")
    # A slow abort: the entry may show `failed` only once its multipart upload is gone from the store.
    proxy.delay(0.5, per="message", match=rb"\ADELETE [^ ]*/forbidden/[^ ]*uploadId=")
    daemon = ServiceThread(settings).start()
    try:
        bad = [enqueue_bytes(settings, os.urandom(5000), filename="small.bin", prefix="forbidden"),
               enqueue_bytes(settings, os.urandom(6 * MIB), filename="big.bin", prefix="forbidden")]
        good = [enqueue_bytes(settings, os.urandom(3000 + i), filename=f"ok-{i}.bin") for i in range(6)]
        good.append(enqueue_bytes(settings, os.urandom(6 * MIB), filename="ok-big.bin"))
        wait_for(lambda: all_in(settings, [e.id for e in good], DONE), what="the other entries' commits")
        wait_for(lambda: all_in(settings, [e.id for e in bad], ("failed",)), what="the denied entries' failure")
        sent = {e.id: requests_for(proxy, e) for e in bad}
        assert entry_rows(settings)[bad[1].id]["upload_id"] is None, "failed before its upload was aborted"
        assert not [u for u in _pending_uploads(direct) if str(bad[1].id) in u[0]], \
            "a failed entry left its multipart upload in the store"
        time.sleep(HOLD)
        assert {e.id: requests_for(proxy, e) for e in bad} == sent, "requests kept coming for failed entries"
        assert small_rule.injected == 1 and part_rule.injected >= 1
        assert_failed_once(settings, bad, "AccessDenied")

        small_rule.remove()
        part_rule.remove()
        assert "re-queued 2" in retry_cli(settings, *(str(e.id) for e in bad))
        wait_for(lambda: all_in(settings, [e.id for e in bad], DONE), what="delivery after retry")
    finally:
        report = daemon.stop()
    assert report.clean, report
    check_invariants(settings, [*bad, *good], view=direct)


def test_missing_bucket_fails_everything_once_then_retry_all(s3_via_proxy: tuple[Settings, Settings,
                                                                                  FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    bucket = f"created-later-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    settings, direct = (s.replace(store=f"s3://{bucket}/root") for s in (settings, direct))
    daemon = ServiceThread(settings).start()
    try:
        entries = [enqueue_bytes(settings, os.urandom(2000 + i), filename=f"f{i}.bin") for i in range(5)]
        entries.append(enqueue_bytes(settings, os.urandom(6 * MIB), filename="big.bin"))
        wait_for(lambda: all_in(settings, [e.id for e in entries], ("failed",)), what="failure")
        sent = len(proxy.messages)
        time.sleep(HOLD)
        assert len(proxy.messages) == sent, "requests kept coming for failed entries"
        assert sent <= 2 * len(entries) + 2, f"{sent} requests for {len(entries)} entries that can never pass"
        assert_failed_once(settings, entries, "NoSuchBucket")
        where = f"bucket {bucket!r} at {settings.s3_endpoint_url} (MLDASH_S3_ENDPOINT_URL)"  # what to check
        assert all(where in row["last_error"] for row in entry_rows(settings).values()), entry_rows(settings)

        _s3(direct).create_bucket(Bucket=bucket)
        assert f"re-queued {len(entries)}" in retry_cli(settings, "--all")
        wait_for(lambda: all_in(settings, [e.id for e in entries], DONE), what="delivery after retry")
    finally:
        report = daemon.stop()
    try:
        assert report.clean, report
        check_invariants(settings, entries, view=direct)
    finally:
        client = _s3(direct)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)


def _fails_once_then_delivers(s3_via_proxy: tuple[Settings, Settings, FaultProxy], error: H.S3Error,
                              check_failed: Callable[[Settings, list, int], None]) -> None:
    """Four small entries and a multipart one meet `error` at the store: each ends failed after one attempt, no
    request follows during the hold (`check_failed(settings, entries, requests sent)` says what else must hold),
    and once the rule is gone `retry --all` delivers them all."""
    settings, direct, proxy = s3_via_proxy
    rule = S3ErrorRule(proxy, error)
    daemon = ServiceThread(settings).start()
    try:
        entries = [enqueue_bytes(settings, os.urandom(1000 + i), filename=f"f{i}.bin") for i in range(4)]
        entries.append(enqueue_bytes(settings, os.urandom(6 * MIB), filename="big.bin"))
        wait_for(lambda: all_in(settings, [e.id for e in entries], ("failed",)), what="failure")
        sent = rule.injected
        time.sleep(HOLD)
        assert rule.injected == sent, "requests kept coming for failed entries"
        check_failed(settings, entries, sent)

        rule.remove()  # the cause was fixed (credentials renewed, endpoint corrected)
        retry_cli(settings, "--all")
        wait_for(lambda: all_in(settings, [e.id for e in entries], DONE), what="delivery after retry")
    finally:
        report = daemon.stop()
    assert report.clean, report
    check_invariants(settings, entries, view=direct)


@pytest.mark.parametrize("error", [H.EXPIRED_TOKEN, H.INVALID_ACCESS_KEY_ID, H.SIGNATURE_DOES_NOT_MATCH],
                         ids=lambda e: e.code)
def test_bad_credentials_fail_once_then_retry(s3_via_proxy: tuple[Settings, Settings, FaultProxy], error) -> None:
    def check_failed(settings: Settings, entries: list, _sent: int) -> None:
        assert_failed_once(settings, entries, error.code, f"{error.status} ")
        for row in entry_rows(settings).values():  # where the credentials came from, and where to put others
            assert "the credentials came from the environment (AWS_ACCESS_KEY_ID" in row["last_error"], row
            assert "docs/operations.md, 'Credentials'" in row["last_error"], row
            assert "testing" not in row["last_error"]  # the fake key id and secret: never shown

    _fails_once_then_delivers(s3_via_proxy, error, check_failed)


@pytest.mark.parametrize("error", [H.TEMPORARY_REDIRECT_NOWHERE, H.PERMANENT_REDIRECT_NOWHERE], ids=lambda e: e.code)
def test_redirect_to_nowhere_fails_once_then_retry(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                   error: H.S3Error) -> None:
    """An endpoint (or a proxy in front of it) answering with a redirect that names neither a Location nor a
    region is misconfigured: each entry fails after one attempt and a few requests, saying what to check. (botocore's
    region lookup used to recurse ~110 HeadBuckets deep for each such answer, ending in a RecursionError the daemon
    took for an outage and retried forever.)"""
    def check_failed(settings: Settings, entries: list, sent: int) -> None:
        # Per entry, at most: a direct PUT, botocore's request and its one HeadBucket; plus the start-up gc's
        # listing and its HeadBucket.
        assert sent <= 3 * len(entries) + 2, f"{sent} requests for {len(entries)} entries that can never pass"
        assert_failed_once(settings, entries, "without a Location or a region")
        assert all("MLDASH_S3_ENDPOINT_URL" in row["last_error"] for row in entry_rows(settings).values())

    _fails_once_then_delivers(s3_via_proxy, error, check_failed)


def test_catalog_refuses_our_user_then_retry_does_not_resend(mongo_settings: Settings, s3_settings: Settings,
                                                             mongo_admin: pymongo.MongoClient) -> None:
    from tests.reliability.conftest import fast

    settings = fast(s3_settings, catalog=mongo_settings.catalog, mongo_database=mongo_settings.mongo_database)
    mongo_admin.admin.command("configureFailPoint", "failCommand", mode="alwaysOn",
                              data={"appName": "mldash", "failCommands": ["insert"], "errorCode": 13})
    try:
        daemon = ServiceThread(settings).start()
        try:
            entries = [enqueue_bytes(settings, os.urandom(3000), filename="f.bin"),
                       enqueue_bytes(settings, os.urandom(6 * MIB), filename="big.bin")]
            wait_for(lambda: all_in(settings, [e.id for e in entries], ("failed",)), what="failure")
            assert_failed_once(settings, entries, "Unauthorized")
            sent = {row["id"]: row["bytes_sent"] for row in entry_rows(settings).values()}
            mongo_admin.admin.command("configureFailPoint", "failCommand", mode="off")
            retry_cli(settings, "--all")
            wait_for(lambda: all_in(settings, [e.id for e in entries], DONE), what="delivery after retry")
        finally:
            report = daemon.stop()
    finally:
        mongo_admin.admin.command("configureFailPoint", "failCommand", mode="off")
    assert report.clean, report
    after = {row["id"]: row["bytes_sent"] for row in entry_rows(settings).values()}
    assert after == sent, "the bytes were already in the store: retrying the commit must not upload them again"
    check_invariants(settings, entries)
