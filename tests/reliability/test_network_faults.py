"""Scenario 3: connection resets at 10/30/50% of connections; lost responses to UploadPart,
CompleteMultipartUpload and CreateMultipartUpload.

The daemon talks to moto through the fault proxy (moto closes every connection after its response, so
each request is one connection). A reset happens at a random point of a request head, at a random point
of a request body, or after the store did the work but before its answer reaches the daemon. Whatever
happens, the drain must finish with every entry committed exactly once with its bytes, and `gc` must
leave no orphaned upload behind (a lost CreateMultipartUpload answer leaves one that only gc can find).
"""

from __future__ import annotations

import os
import random

import pytest

from mldash.config import Settings
from mldash.spool.manifest import Manifest
from mldash_syncd import drain
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes
from tests.reliability.conftest import MIB, loop_count
from tests.reliability.invariants import check_invariants


def workload(settings: Settings, rng: random.Random, small: int = 10, big: int = 2) -> list[Manifest]:
    entries = [enqueue_bytes(settings, os.urandom(rng.randrange(0, 100_000)), filename=f"small-{i}.bin")
               for i in range(small)]
    entries += [enqueue_bytes(settings, os.urandom(rng.randrange(5 * MIB + 1, 11 * MIB)), filename=f"big-{i}.bin",
                              prefix="ckpt/big") for i in range(big)]
    return entries


def drain_and_check(settings: Settings, direct: Settings, entries: list[Manifest]):
    report = drain(settings, max_wait=120)
    assert report.committed == len(entries) and report.clean, report
    return check_invariants(settings, entries, view=direct)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_connection_resets(s3_via_proxy: tuple[Settings, Settings, FaultProxy], rate: float,
                           request: pytest.FixtureRequest) -> None:
    settings, direct, proxy = s3_via_proxy
    rng = random.Random(int(rate * 100))
    # Three ways to lose a connection — mid-head, mid-body, answer lost — each drawn independently with
    # probability `each`, so that a request meets at least one of them with probability `rate`.
    each = 1 - (1 - rate) ** (1 / 3)
    head = proxy.reset_after_bytes((0, 300), probability=each)
    body = [proxy.reset_after_bytes((0, 5 * MIB), probability=each, match=H.UPLOAD_PART),
            proxy.reset_after_bytes((0, 20_000), probability=each, match=H.PUT_OBJECT)]
    answer = proxy.reset_before_response(probability=each)
    rounds = loop_count(request, 2)
    for _ in range(rounds):
        entries = workload(settings, rng)
        drain_and_check(settings, direct, entries)
    mid_body = sum(fault.injected for fault in body)
    faulted = {(e.conn_id, e.message_index) for e in proxy.events}
    messages = proxy.stats().messages
    print(f"resets at {rate:.0%}: {len(faulted)} of {messages} requests reset "
          f"(head {head.injected}, body {mid_body}, answer lost {answer.injected})")
    assert len(faulted) >= rate * messages / 2, "the faults did not happen often enough to mean anything"
    assert head.injected and answer.injected


def test_lost_upload_part_responses(s3_via_proxy: tuple[Settings, Settings, FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    # aiohttp re-sends an idempotent PUT once by itself, botocore retries once: 4 losses in a row reach the daemon.
    lost = proxy.reset_before_response(match=H.UPLOAD_PART, times=4)
    entries = workload(settings, random.Random(3), small=1, big=2)
    drain_and_check(settings, direct, entries)
    assert lost.injected == 4


def test_lost_complete_multipart_responses(s3_via_proxy: tuple[Settings, Settings, FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    lost = proxy.reset_before_response(match=H.COMPLETE_MULTIPART_UPLOAD, times=3)
    entries = workload(settings, random.Random(4), small=1, big=3)
    drain_and_check(settings, direct, entries)
    assert lost.injected == 3
    # Each lost answer was followed by asking the store again about that object: by repeating the Complete
    # (botocore's one retry, answered "already done" once it had landed) or, in the entry's next attempt, by a
    # HEAD of its key. Which one depends on how the three losses fall on the files, so either counts.
    messages = proxy.messages
    completes = [m for m in messages if m.method == "POST" and m.target and "uploadId=" in m.target]
    losses = [m for m in completes if m.faults]
    assert len(losses) == 3
    for loss in losses:
        path = loss.target.split("?", 1)[0]
        assert any(m.time > loss.time and m.target and m.target.split("?", 1)[0] == path
                   and (m.method == "HEAD" or m in completes) for m in messages), (
            f"nothing asked about {path} again after its Complete's answer was lost")


def test_lost_create_multipart_response_leaves_orphan_for_gc(s3_via_proxy: tuple[Settings, Settings,
                                                                                   FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    lost = proxy.reset_before_response(match=H.CREATE_MULTIPART_UPLOAD, times=2)
    entries = workload(settings, random.Random(5), small=0, big=1)
    report = drain_and_check(settings, direct, entries)
    assert lost.injected == 2
    assert report.aborted_by_gc == 2, "gc must abort the uploads whose creation the daemon never heard of"
