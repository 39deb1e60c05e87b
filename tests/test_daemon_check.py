"""`mldash-syncd check`: the store and catalog tried for what the daemon relies on — against the real local
store and moto's S3 server, and against stores that break a guarantee (fault injection at the interface)."""

from __future__ import annotations

import asyncio
import json

import pytest

from mldash.config import Settings
from mldash.store import make_store
from mldash_syncd.check import FAIL, OK, WARN, check
from tests.backend_helpers import list_objects
from tests.faults.wrapped import Wrapped
from tests.test_daemon_process import cli


def verdicts(findings) -> dict[str, str]:
    return {f.what.split(":")[0]: f.verdict for f in findings}


def test_the_local_store_and_catalog_pass_and_nothing_is_left(settings: Settings, tmp_path) -> None:
    first = cli(settings, "check")  # creates the store's folder and the catalog, and says so (test below)
    assert first.returncode == 0 and "did not exist" in first.stdout, first.stdout
    done = cli(settings, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"store    {settings.store}"
    assert all(line.startswith(("store", "catalog", "  ok ")) for line in lines), done.stdout
    for expected in ("a conditional create (If-None-Match: *) refuses to overwrite",
                     "a conditional completion of a multipart upload refuses to overwrite",
                     "SHA256 checksums are recorded and reported", "probe objects removed",
                     "bytes that do not match the SHA256 sent with them are refused"):
        assert f"  ok    {expected}" in lines, done.stdout
    store_root = tmp_path / "store"
    assert not [p for p in store_root.rglob("*") if p.is_file() and p.name != ".lock"]
    as_json = json.loads(cli(settings, "check", "--json").stdout)
    assert as_json["store"] == f"file://{store_root}" and as_json["catalog"].startswith("sqlite://")
    findings = as_json["findings"]
    assert {f["target"] for f in findings} == {"store", "catalog"} and all(f["verdict"] == OK for f in findings)


def test_moto_s3_passes_what_it_honours(s3_settings: Settings) -> None:
    done = cli(s3_settings, "check")
    assert "  ok    a conditional create (If-None-Match: *) refuses to overwrite" in done.stdout, done.stdout
    assert "  ok    multipart upload with SHA256 part checksums (composite checksum " in done.stdout
    assert "FAIL" not in done.stdout and done.returncode == 0, done.stdout + done.stderr
    assert not [key for key in list_objects(s3_settings) if "mldash-check" in key]


class IgnoresConditions(Wrapped):
    """An S3-compatible gateway that drops If-None-Match: a create over an existing key replaces it."""

    async def put(self, key, data, sha256_b64):
        await self._inner.delete(key)
        return await self._inner.put(key, data, sha256_b64)

    async def complete_multipart(self, key, upload_id, parts):
        await self._inner.delete(key)
        return await self._inner.complete_multipart(key, upload_id, parts)


class CannotDelete(Wrapped):
    async def delete(self, key):
        from mldash.store.base import PermanentStoreError

        raise PermanentStoreError(f"delete {key!r}: AccessDenied", code="AccessDenied")


def test_a_store_that_ignores_conditional_writes_fails_the_check(settings: Settings) -> None:
    findings = asyncio.run(check(settings, store=IgnoresConditions(make_store(settings))))
    failed = [f.what for f in findings if f.verdict == FAIL]
    assert len(failed) == 2, findings
    assert failed[0].startswith("the store ignores If-None-Match: a second PUT replaced the object")
    assert failed[1].startswith("the store ignores If-None-Match when completing a multipart upload")


def test_credentials_without_delete_are_a_warning_naming_the_probes(settings: Settings, tmp_path) -> None:
    findings = asyncio.run(check(settings, store=CannotDelete(make_store(settings))))
    warned = [f.what for f in findings if f.verdict == WARN and "did not exist" not in f.what]
    assert len(warned) == 1 and warned[0].startswith("probe objects could not be removed (no delete permission?")
    assert "mldash-check/" in warned[0] and not [f for f in findings if f.verdict == FAIL]


@pytest.mark.parametrize("store", ["s3://no-such-bucket-here/root"])
def test_a_store_that_cannot_be_used_fails_with_the_reason(s3_settings: Settings, store: str) -> None:
    done = cli(s3_settings.replace(store=store), "check")
    assert done.returncode == 1 and "  FAIL " in done.stdout, done.stdout + done.stderr


def test_a_store_and_catalog_that_did_not_exist_are_said_to_be_new(settings: Settings, tmp_path) -> None:
    typo = settings.replace(store=(tmp_path / "typo-store").as_uri(),
                            catalog="sqlite://" + str(tmp_path / "typo-dir" / "catalog.sqlite"))
    done = cli(typo, "check")
    assert done.returncode == 0, done.stdout
    assert f"  warn  {tmp_path / 'typo-store'} did not exist: this check created it, empty" in done.stdout
    assert f"  warn  {tmp_path / 'typo-dir' / 'catalog.sqlite'} did not exist" in done.stdout
    again = cli(typo, "check")  # they exist now: nothing to say
    assert "did not exist" not in again.stdout
