"""Scenario 5: a storm of 503 SlowDown for a while, then recovery.

The fault proxy answers every S3 request with 503 SlowDown for STORM seconds while a daemon drains a
spool, then lets requests through to moto again. During the storm the request rate stays bounded — the
store gate backs off exponentially with jitter and every upload waits on it; botocore adds at most one
retry per call — and no attempt is burned (an outage is not the entry's fault). After it, the same run
drains everything, exactly once.

The bound: each gate opening lets at most max_concurrent_files uploads try, each call at most twice
(botocore's one retry), and after the first few failures the gate stays closed for a random time up to
retry_max_delay; so a second sees a few dozen requests at most, where a retry loop without backoff would
send hundreds to thousands.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout
from mldash_syncd import drain
from tests.faults import FaultProxy, max_rate
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes
from tests.reliability.conftest import MIB, loop_count
from tests.reliability.invariants import check_invariants

STORM = 6.0
MAX_PER_SECOND = 40


def storm_round(settings: Settings, direct: Settings, proxy: FaultProxy, seed: int) -> None:
    entries = [enqueue_bytes(settings, os.urandom(1000 + i), filename=f"f{seed}-{i}") for i in range(12)]
    entries.append(enqueue_bytes(settings, os.urandom(6 * MIB), filename=f"big-{seed}"))
    proxy.reset_stats()
    storm = proxy.respond(H.SLOW_DOWN.response(H.next_request_id()))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(report=drain(settings, max_wait=120)))
    started = time.monotonic()
    thread.start()
    time.sleep(STORM)
    storm.remove()
    ended = time.monotonic()
    thread.join(90)
    assert not thread.is_alive(), "the daemon did not drain after the storm"

    during = [m.time for m in proxy.messages if started <= m.time <= ended]
    rate = max_rate(during, window=1.0)
    print(f"SlowDown storm of {STORM:.0f}s: {storm.injected} requests answered 503, at most {rate}/s; "
          f"{len(proxy.messages) - len(during)} requests after it")
    assert storm.injected >= 3, "the storm did not reach the daemon"
    assert rate <= MAX_PER_SECOND, f"{rate} requests/s during a SlowDown storm: the daemon does not back off"
    report = result["report"]
    assert report.committed == len(entries) and report.clean, report
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        assert all(row["attempts"] <= 1 for row in index.rows()), "a throttling storm burned attempts"
    finally:
        index.close()
    check_invariants(settings, entries, view=direct)


def test_slowdown_storm_bounded_rate_then_drained(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                  request: pytest.FixtureRequest) -> None:
    settings, direct, proxy = s3_via_proxy
    # Realistic backoff (not the suite's 0.5 s cap): 0.2 s first step, at most 4 s; 8 uploads at once.
    # (Measured here: ≤ ~20 requests/s with the gate; > 500/s with the gate's backoff switched off.)
    settings = settings.replace(retry_base_delay=0.2, retry_max_delay=4.0, max_concurrent_files=8)
    for round_ in range(loop_count(request, 1)):
        storm_round(settings, direct, proxy, round_)
