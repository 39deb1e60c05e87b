"""Scenario 4: blackholed S3 and blackholed MongoDB — every operation gives up within its deadline,
nothing hangs, no attempt is burned, and the queue resumes when the endpoint returns.

Two views of each dependency:
- against a server that accepts and never answers (it records when each connection was opened and when
  the daemon gave up on it): every connection is abandoned within its call's deadline, and the daemon
  keeps retrying (later connections) instead of hanging on the first;
- against moto / MongoDB behind the fault proxy, blackholed in the middle of the work (open connections
  included) and restored a few seconds later: the same daemon run drains everything, exactly once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout, State
from mldash_syncd import drain
from tests.faults import BlackholeServer, FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes
from tests.fixtures.faults import mongo_uri_via
from tests.reliability.conftest import MIB, fast
from tests.reliability.invariants import check_invariants

DEADLINE = 1.0  # request_timeout in these tests
PART_DEADLINE = DEADLINE + 5 * 0.5  # S3Store scales a body's deadline: + 0.5 s per MiB
SLACK = 1.5  # scheduling on a busy 2-core machine


class HoldingServer(BlackholeServer):
    """A blackhole that also records, per connection, when it was accepted and when the client let go."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[tuple[float, float | None]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened = time.monotonic()
        slot = len(self.spans)
        self.spans.append((opened, None))
        try:
            await super().handle(reader, writer)
        finally:
            self.spans[slot] = (opened, time.monotonic())


@pytest.fixture
def holding_server() -> Iterator[HoldingServer]:
    with HoldingServer() as server:
        yield server


def rows(settings: Settings) -> dict[int, dict[str, Any]]:
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        return {row["id"]: row for row in index.rows()}
    finally:
        index.close()


def assert_connections_abandoned_in_time(server: HoldingServer, deadline: float) -> None:
    time.sleep(0.2)  # the last closes reach the server's loop
    spans = list(server.spans)
    assert len(spans) >= 2, f"only {len(spans)} connection(s): the daemon did not retry after giving up"
    for opened, closed in spans:
        assert closed is not None, "a connection to the blackhole is still open after the daemon stopped"
        assert closed - opened <= deadline + SLACK, f"a call waited {closed - opened:.1f}s (deadline {deadline}s)"


def background_drain(settings: Settings, max_wait: float) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = drain(settings, max_wait=max_wait)
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    thread = threading.Thread(target=run, name="drain")
    thread.start()
    return thread, result


def finish(thread: threading.Thread, result: dict[str, Any], timeout: float = 90.0):
    thread.join(timeout)
    assert not thread.is_alive(), "the daemon hangs"
    if "error" in result:
        raise result["error"]
    return result["report"]


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- S3 ------------------------------------------------------------------------------------------------

def test_blackholed_s3_every_call_gives_up_within_its_deadline(s3_settings: Settings,
                                                                 holding_server: HoldingServer) -> None:
    view = fast(s3_settings, request_timeout=DEADLINE)  # the same bucket on moto, to check the store afterwards
    dead = view.replace(s3_endpoint_url=holding_server.url)
    entries = [enqueue_bytes(dead, b"abc", filename="small"), enqueue_bytes(dead, os.urandom(6 * MIB), filename="big")]

    report = drain(dead, max_wait=4.5)

    assert report.committed == 0
    assert_connections_abandoned_in_time(holding_server, PART_DEADLINE)
    for entry in entries:
        row = rows(dead)[entry.id]
        assert row["state"] == State.QUEUED and row["attempts"] == 0, "an outage must not burn attempts"
        assert row["error_kind"] == "outage" and "deadline" in row["last_error"], row["last_error"]
    check_invariants(dead, entries, view=view, allow={State.QUEUED})


def test_blackholed_s3_mid_upload_then_back(s3_via_proxy: tuple[Settings, Settings, FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    settings = settings.replace(request_timeout=DEADLINE)
    entries = [enqueue_bytes(settings, os.urandom(n), filename=f"f{n}") for n in (10, 100_000, 7 * MIB, 12 * MIB)]
    thread, result = background_drain(settings, max_wait=120)
    wait_for(lambda: any(m.target and "partNumber=" in m.target for m in proxy.messages))
    hole = proxy.blackhole()  # open connections included: parts in flight go silent
    time.sleep(4 * DEADLINE)
    swallowed = len(proxy.messages)
    proxy.clear()

    report = finish(thread, result)
    assert hole.injected >= 1
    assert report.committed == len(entries) and report.clean, report
    assert len(proxy.messages) > swallowed, "nothing was sent after the store came back"
    check_invariants(settings, entries, view=direct)


def test_blackholed_s3_puts_only(s3_via_proxy: tuple[Settings, Settings, FaultProxy]) -> None:
    """Only bodies vanish (heads, lists and creates still answer): the part deadline ends each hung PUT."""
    settings, direct, proxy = s3_via_proxy
    settings = settings.replace(request_timeout=DEADLINE)
    hole = proxy.blackhole(match=H.UPLOAD_PART, times=3)
    entries = [enqueue_bytes(settings, os.urandom(6 * MIB), filename="big"),
               enqueue_bytes(settings, b"x", filename="small")]
    started = time.monotonic()
    report = drain(settings, max_wait=120)
    assert hole.injected == 3
    assert report.committed == 2 and report.clean, report
    assert time.monotonic() - started < 60, "hung parts must be abandoned at their deadline"
    check_invariants(settings, entries, view=direct)


# ---- MongoDB -------------------------------------------------------------------------------------------

def test_blackholed_mongo_every_call_gives_up_within_its_deadline(mongo_settings: Settings,
                                                                    holding_server: HoldingServer) -> None:
    view = fast(mongo_settings, request_timeout=DEADLINE)  # the same database, reachable, to check it afterwards
    dead = view.replace(catalog=f"mongodb://127.0.0.1:{holding_server.port}/?directConnection=true")
    entries = [enqueue_bytes(dead, os.urandom(1000), filename=f"f{i}") for i in range(3)]

    report = drain(dead, max_wait=4.5)

    assert report.committed == 0
    # pymongo's driver timeout is timeoutMS = request_timeout; the outer asyncio deadline adds 1 s of grace.
    assert_connections_abandoned_in_time(holding_server, DEADLINE + 1.0)
    for entry in entries:
        row = rows(dead)[entry.id]
        assert row["state"] == State.UPLOADED, "uploads go on while the catalog is unreachable"
        assert row["attempts"] == 0 and row["error_kind"] == "outage" and row["last_error"], row
    check_invariants(dead, entries, view=view, allow={State.UPLOADED})


def test_blackholed_mongo_mid_commits_then_back(mongo_settings: Settings, mongo_uri: str,
                                                fault_proxy) -> None:
    proxy = fault_proxy(mongo_uri, protocol="mongo")
    direct = fast(mongo_settings, request_timeout=DEADLINE)
    settings = direct.replace(catalog=mongo_uri_via(proxy, mongo_uri))
    entries = [enqueue_bytes(settings, os.urandom(1000), filename=f"f{i}") for i in range(6)]
    hole = proxy.blackhole()
    thread, result = background_drain(settings, max_wait=120)
    wait_for(lambda: sum(1 for r in rows_or_empty(settings).values() if r["state"] == "uploaded") == len(entries))
    time.sleep(3 * DEADLINE)  # commits keep timing out meanwhile
    proxy.clear()
    report = finish(thread, result)
    assert hole.injected >= 1
    assert report.committed == len(entries) and report.clean, report
    check_invariants(settings, entries, view=direct)


def rows_or_empty(settings: Settings) -> dict[int, dict[str, Any]]:
    index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
    if index is None:
        return {}
    try:
        return {row["id"]: row for row in index.rows()}
    except Exception:
        return {}
    finally:
        index.close()
