"""Scenario 2: kill -9 of the daemon at random points during single and multipart uploads and between
upload and catalog commit; afterwards everything is committed exactly once and little is re-sent.

Each iteration spools a multipart entry (2–3 parts of 5 MiB) and two small ones into a fresh spool and
store root, then runs `mldash-syncd run` (forked, see forkserver.py) against moto behind a fault proxy
and kills it 1–3 times: at an exact step through a kill hook (children.KILL_POINTS: after the multipart
upload was created, during/after an UploadPart or PutObject, after CompleteMultipartUpload, after
"uploaded" was recorded, just before/after the catalog upsert) or after a random number of S3 requests
plus a random delay. A last run drains the spool; the invariants are checked and the iteration's objects
deleted (moto keeps every byte in RAM).

Re-sent bytes: the proxy records every request. A part (or a PutObject) sent in one daemon run and sent
again in a later run is waste caused by the kill that ended the first run. Per kill, that waste must
fit in what the daemon can have in flight: its byte budget, max_concurrent_parts × part_size — i.e. the
parts the store already holds are never sent again.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout
from mldash_syncd import drain
from tests.backend_helpers import _s3
from tests.faults import FaultProxy, MessageRecord
from tests.fixtures.daemon import enqueue_bytes, settings_env
from tests.reliability.children import KILL_POINTS
from tests.reliability.conftest import MIB, loop_count
from tests.reliability.forkserver import ForkServer
from tests.reliability.invariants import check_invariants

POINTS = [*KILL_POINTS, "random"]


@dataclass
class Stats:
    kills: int = 0
    by_point: collections.Counter = field(default_factory=collections.Counter)
    fired: collections.Counter = field(default_factory=collections.Counter)  # hooks that hit their step
    first: collections.Counter = field(default_factory=collections.Counter)  # hook kills on a fresh spool
    resent_bytes: int = 0
    kept_parts: int = 0  # parts sent before a kill and not sent again: the resume worked
    worst_waste: int = 0


def drained(settings: Settings, entries: int) -> bool:
    """True once the index holds all `entries` and none of them is still pending."""
    index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
    if index is None:
        return False
    try:
        counts = index.counts()
    except Exception:  # the daemon may be creating the schema right now
        return False
    finally:
        index.close()
    busy = sum(counts[s]["count"] for s in ("queued", "uploading", "uploaded"))
    return busy == 0 and sum(c["count"] for c in counts.values()) >= entries


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def sends(records: list[MessageRecord], root: str) -> list[tuple[MessageRecord, tuple[str, int]]]:
    """(record, (key, part number; 0 for a PutObject)) of every PUT of an object or a part."""
    out = []
    for record in records:
        if record.method != "PUT" or not record.target:
            continue
        url = urllib.parse.urlsplit(record.target)
        key = urllib.parse.unquote(url.path.split("/", 2)[2])
        if not key.startswith(root + "/"):
            continue
        part = int(urllib.parse.parse_qs(url.query).get("partNumber", ["0"])[0])
        out.append((record, (key, part)))
    return out


def one_iteration(i: int, rng: random.Random, daemon_settings: Settings, direct: Settings, proxy: FaultProxy,
                  fork_server: ForkServer, base: Path, stats: Stats) -> None:
    run = base / f"run-{i}"
    run.mkdir()
    root = f"kill-{i}"
    bucket = direct.store.split("/")[2]
    where = dict(spool=run / "spool", store=f"s3://{bucket}/{root}", catalog="sqlite://" + str(run / "catalog.sqlite"))
    local, view = daemon_settings.replace(**where), direct.replace(**where)
    entries = [enqueue_bytes(local, os.urandom(rng.randrange(5 * MIB + 1, 15 * MIB)), filename="big.bin"),
               enqueue_bytes(local, os.urandom(rng.randrange(1, 200_000)), filename="small-1.bin"),
               enqueue_bytes(local, os.urandom(rng.randrange(1, 200_000)), filename="small-2.bin", prefix="other")]
    env = settings_env(local)

    run_starts = []
    for k in range(rng.choice((1, 2, 2, 3))):
        # The first kill of a fresh spool goes through every step in turn (each can still happen); later
        # ones pick any step, any occurrence, or a random moment.
        point = POINTS[i % len(POINTS)] if k == 0 else rng.choice(POINTS)
        nth = 1 if k == 0 else rng.choice((1, 1, 2))
        before = len(proxy.messages)
        run_starts.append(time.monotonic())
        daemon = fork_server.spawn("run_daemon", env=env, log=run / f"daemon-{k}.log", args=["run"],
                                   kill_at=None if point == "random" else point, nth=nth,
                                   delay=rng.uniform(0.0, 0.05))
        if point == "random":
            target = before + rng.randrange(0, 10)
            wait_until(lambda t=target: len(proxy.messages) >= t or drained(local, len(entries)), 30)
            time.sleep(rng.uniform(0, 0.03))
        else:
            wait_until(lambda d=daemon: d.poll() is not None or drained(local, len(entries)), 30)
        if daemon.poll() is not None:
            stats.fired[point] += 1  # the hook killed it at its step
            stats.first[point] += k == 0
        elif k == 0 and point != "random":
            raise AssertionError(f"iteration {i}: kill hook {point} never reached on a fresh spool")
        daemon.kill()
        code = daemon.wait()
        assert code == -signal.SIGKILL, f"daemon exited {code}:\n{daemon.log()[-3000:]}"
        stats.kills += 1
        stats.by_point[point] += 1
    run_starts.append(time.monotonic())

    report = drain(local, max_wait=60)
    assert report.clean, report
    check_invariants(local, entries, view=view)

    # Re-sent bytes per kill: a send in run r repeated in a later run was in flight when run r was killed.
    timeline = sends(proxy.messages, root)
    def run_of(t: float) -> int:
        return sum(1 for start in run_starts if start <= t) - 1
    last_run: dict[tuple[str, int], int] = {}
    for record, what in timeline:
        last_run[what] = max(last_run.get(what, -1), run_of(record.time))
    waste: collections.Counter = collections.Counter()
    for record, what in timeline:
        r = run_of(record.time)
        if r < last_run[what]:
            waste[r] += record.content_length or 0
            # A part the store confirmed is listed by ListParts on resume: it must never be sent again.
            assert not (what[1] and record.complete and record.status == 200), (
                f"iteration {i}: part {what[1]} of {what[0]} was stored (200 delivered) before the kill ending run "
                f"{r}, yet sent again")
        elif r < len(run_starts) - 1 and what[1]:
            stats.kept_parts += 1  # a part sent in a killed run and never again
    budget = local.max_concurrent_parts * local.part_size
    for r, wasted in waste.items():
        assert wasted <= budget, (f"iteration {i}: the kill ending run {r} caused {wasted} re-sent bytes, more "
                                  f"than the {budget} bytes the daemon can have in flight")
    stats.resent_bytes += sum(waste.values())
    stats.worst_waste = max(stats.worst_waste, *waste.values(), 0)

    client = _s3(view)  # free moto's memory
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root + "/"):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


def kill_daemon_loop(s3_via_proxy, fork_server: ForkServer, base: Path, kills: int, seed: int) -> Stats:
    daemon_settings, direct, proxy = s3_via_proxy
    rng = random.Random(seed)
    stats = Stats()
    i = 0
    while stats.kills < kills:
        one_iteration(i, rng, daemon_settings, direct, proxy, fork_server, base, stats)
        proxy.reset_stats()
        i += 1
    print(f"kill -9 of the daemon: {stats.kills} kills in {i} iterations; by point {dict(stats.by_point)}; "
          f"re-sent {stats.resent_bytes / MIB:.1f} MiB in all, worst {stats.worst_waste / MIB:.1f} MiB per kill; "
          f"{stats.kept_parts} parts kept across kills; hooks fired {dict(stats.fired)}")
    if i >= len(POINTS):  # every step had its turn as an iteration's first kill
        assert all(stats.first[point] for point in KILL_POINTS), dict(stats.first)
    if stats.kills >= 50:
        assert stats.kept_parts > 0, "no kill ever interrupted a multipart upload that was then resumed"
    return stats


@pytest.mark.timeout(600)  # scales with --iterations
def test_kill9_daemon_at_random_points(s3_via_proxy, fork_server: ForkServer, run_dir: Path,
                                       request: pytest.FixtureRequest) -> None:
    kill_daemon_loop(s3_via_proxy, fork_server, run_dir, loop_count(request, 100), seed=7)


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_kill9_daemon_at_random_points_long(s3_via_proxy, fork_server: ForkServer, run_dir: Path,
                                            request: pytest.FixtureRequest) -> None:
    kill_daemon_loop(s3_via_proxy, fork_server, run_dir, loop_count(request, 100), seed=8)
