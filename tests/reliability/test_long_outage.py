"""A store outage long enough for the store gate to count more than 1,024 failed requests.

The gate counts every failed request of an outage (each upload in flight fails at every probe), and its backoff
computed base·2^(failures−1): past 1,024 failures, a few minutes into an outage with a backlog of checkpoints,
that no longer fit a float, and every upload worker died of an OverflowError — in silence, its entries leased
(`uploading`) until the leases expired, the daemon's heartbeat still saying all was well. Here 64 uploads in
flight against a refusing endpoint reach that count in seconds; then the store comes back, and every entry must
be committed, exactly once, by the same daemon — with no task ended by an error.
"""

from __future__ import annotations

import logging
import os

import pytest

from mldash.config import Settings
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes
from tests.reliability.conftest import fast
from tests.reliability.helpers import ServiceThread, all_in, wait_for
from tests.reliability.invariants import check_invariants

DONE = ("committed", "evicted")
FAILURES = 1100  # past 2**10: where the backoff overflowed


def test_an_outage_past_a_thousand_failed_requests_still_ends_in_every_commit(
        s3_via_proxy: tuple[Settings, Settings, FaultProxy], caplog: pytest.LogCaptureFixture) -> None:
    settings, direct, proxy = s3_via_proxy
    live = fast(settings, max_concurrent_files=64, retry_max_delay=0.1)
    down = proxy.refuse()
    entries = [enqueue_bytes(live, os.urandom(2000), filename=f"step-{i}.json") for i in range(80)]
    with caplog.at_level(logging.WARNING, logger="mldash_syncd"):
        daemon = ServiceThread(live).start()
        try:
            wait_for(lambda: daemon.daemon.store_gate.failures > FAILURES, timeout=120,
                     what=f"{FAILURES} failed requests")
            assert daemon.alive and not [r for r in caplog.records if "ended by an error" in r.getMessage()]
            down.remove()
            wait_for(lambda: all_in(live, [e.id for e in entries], DONE), timeout=60,
                     what="every commit once the store is back")
        finally:
            report = daemon.stop()
    crashed = [r.getMessage() for r in caplog.records if "ended by an error" in r.getMessage()
               or "recording the failure failed" in r.getMessage()]
    assert not crashed, crashed
    assert report.committed == len(entries) and report.clean, report
    check_invariants(live, entries, view=direct)


def test_a_bug_while_recording_a_failure_is_logged_and_the_entry_goes_back_at_once(
        s3_via_proxy: tuple[Settings, Settings, FaultProxy], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net under the fix above: whatever goes wrong while a failure is recorded, the worker says so
    with a traceback and hands the entry back at the next heartbeat — not when its lease runs out minutes later."""
    from mldash_syncd.service import Daemon

    settings, direct, proxy = s3_via_proxy
    live = fast(settings, lease_seconds=600.0)
    route = Daemon._route_failure
    calls = []

    def broken_once(self: Daemon, *args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug in the retry policy")
        route(self, *args, **kwargs)

    monkeypatch.setattr(Daemon, "_route_failure", broken_once)
    # The upload's PUTs fail until the failure has been routed (a count of refused connections raced the
    # daemon's start-up requests for them: under load, none was left for the PUT).
    failing = proxy.respond(H.INTERNAL_ERROR.response(H.next_request_id()), match=H.PUT_OBJECT)
    entry = enqueue_bytes(live, os.urandom(2000), filename="ckpt.json")
    with caplog.at_level(logging.WARNING, logger="mldash_syncd"):
        daemon = ServiceThread(live).start()
        try:
            wait_for(lambda: calls, timeout=30, what="the upload's failure routed")
            failing.remove()
            wait_for(lambda: all_in(live, [entry.id], DONE), timeout=30, what="the commit after the bug")
        finally:
            report = daemon.stop()
    logged = [r for r in caplog.records if "recording the failure failed too" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None and calls
    assert report.committed == 1
    check_invariants(live, [entry], view=direct)


def test_run_once_at_its_max_wait_says_what_it_waited_for(
        s3_via_proxy: tuple[Settings, Settings, FaultProxy], caplog: pytest.LogCaptureFixture) -> None:
    """`run --once --max-wait` ending with work left used to say only that; it now names the unreachable store."""
    from mldash_syncd import drain

    settings, _direct, proxy = s3_via_proxy
    proxy.refuse()
    enqueue_bytes(settings, b"{}", filename="m.json")
    with caplog.at_level(logging.WARNING, logger="mldash_syncd"):
        report = drain(settings, max_wait=1.5)
    assert report.pending == 1
    ended = [r.getMessage() for r in caplog.records if "max wait reached" in r.getMessage()]
    assert len(ended) == 1 and "(store unreachable: " in ended[0] and "Connect" in ended[0], ended
