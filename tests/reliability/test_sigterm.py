"""Scenario 10: SIGTERM mid-upload — a clean stop within the unit's stop timeout (TimeoutStopSec=60 in
systemd/*.service), then a resume that re-sends only what was in flight.

`mldash-syncd run` (the real CLI entry point with its signal handlers, forked from the fork server) uploads
through the fault proxy, which slows parts down so the signal lands mid-part. At a random moment it gets
SIGTERM (with stop_grace = 1 s for in-flight work instead of 20 s, so the stop cuts the big file short):
it must exit 0 within the stop timeout, leave no entry `uploading` or leased, and keep the multipart
upload resumable. `mldash-syncd run --once` then finishes; bytes re-sent on resume are at most
what the stop interrupted (the daemon's in-flight budget). One more case, with the real 20 s grace: the
part in flight is blackholed (its call would wait for its own long deadline), and the stop still ends in
time. And a second SIGTERM ends the grace period at once.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.spool import State
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes, settings_env
from tests.reliability.conftest import MIB, loop_count
from tests.reliability.forkserver import ForkServer
from tests.reliability.helpers import entry_rows, wait_for
from tests.reliability.invariants import check_invariants

STOP_TIMEOUT = 60.0  # TimeoutStopSec of the systemd units


def sigterm_round(i: int, rng: random.Random, settings: Settings, direct: Settings, proxy: FaultProxy,
                  fork_server: ForkServer, base: Path, *, hang_a_part: bool = False,
                  stop_grace: float | None = None) -> bool:
    run = base / f"run-{i}"
    run.mkdir()
    root = f"sigterm-{i}"
    bucket = direct.store.split("/")[2]
    where = dict(spool=run / "spool", store=f"s3://{bucket}/{root}", catalog="sqlite://" + str(run / "catalog.sqlite"))
    local, view = settings.replace(**where), direct.replace(**where)
    if stop_grace is not None:
        local = local.replace(stop_grace=stop_grace)
    entries = [enqueue_bytes(local, os.urandom(rng.randrange(16 * MIB, 26 * MIB)), filename="big.bin")]
    entries += [enqueue_bytes(local, os.urandom(rng.randrange(1, 100_000)), filename=f"small-{k}.bin")
                for k in range(3)]
    env = settings_env(local)

    slow = proxy.delay(0.01, per="chunk", match=H.UPLOAD_PART)  # ~0.8 s per 5 MiB part
    hang = proxy.blackhole(match=H.UPLOAD_PART, times=1, skip=1) if hang_a_part else None
    daemon = fork_server.spawn("run_daemon", env=env, log=run / "daemon.log", args=["run"])
    parts_seen = rng.randrange(1, 4)
    wait_for(lambda: sum(1 for m in proxy.messages if m.target and root in m.target and "partNumber=" in m.target)
             >= parts_seen, what="parts in flight")
    if hang is not None:
        wait_for(lambda: hang.injected, what="a hung part")
    time.sleep(rng.uniform(0, 0.5))
    sent_before_stop = sum(r["bytes_sent"] for r in entry_rows(local).values())

    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    code = daemon.wait(timeout=STOP_TIMEOUT + 30)
    took = time.monotonic() - started
    assert code == 0, f"exit {code} after SIGTERM:\n{daemon.log()[-3000:]}"
    assert took < STOP_TIMEOUT, f"stop took {took:.0f}s; systemd would SIGKILL it after {STOP_TIMEOUT:.0f}s"
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
    slow.remove()
    if hang is not None:
        hang.remove()
    rows = entry_rows(local)
    interrupted = rows[entries[0].id]["state"] == State.QUEUED
    assert all(r["state"] != State.UPLOADING and r["lease_owner"] is None for r in rows.values()), rows
    # Stopped, not finished: the unfinished entries wait (their multipart upload is kept for the resume).
    check_invariants(local, entries, view=view, allow={State.QUEUED, State.UPLOADED})
    sent_at_stop = sum(r["bytes_sent"] for r in rows.values())

    resume = fork_server.spawn("run_daemon", env=env, log=run / "resume.log", args=["run", "--once", "--quiet"])
    assert resume.wait(timeout=120) == 0, resume.log()[-3000:]
    check_invariants(local, entries, view=view)
    total = sum(e.size for e in entries)
    resent = sum(r["bytes_sent"] for r in entry_rows(local).values()) - total
    budget = local.max_concurrent_parts * local.part_size
    assert resent <= budget, (f"resume re-sent {resent} bytes; the stop can only have interrupted {budget} "
                              f"(sent before the signal {sent_before_stop}, at the stop {sent_at_stop})")
    return interrupted


def test_sigterm_mid_upload_stops_cleanly_and_resumes(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                      fork_server: ForkServer, run_dir: Path,
                                                      request: pytest.FixtureRequest) -> None:
    settings, direct, proxy = s3_via_proxy
    rng = random.Random(10)
    rounds = loop_count(request, 4)
    # A 1 s grace (the real one is 20 s) so the stop cuts the big file short at a random point: in-flight
    # parts get their second, the rest of the file waits for the resume.
    interrupted = sum(sigterm_round(i, rng, settings, direct, proxy, fork_server, run_dir, stop_grace=1.0)
                      for i in range(rounds))
    assert interrupted >= rounds // 2, "the stop hardly ever interrupted an upload: the test tests nothing"


def test_sigterm_while_a_part_hangs_still_stops_in_time(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                        fork_server: ForkServer, run_dir: Path) -> None:
    settings, direct, proxy = s3_via_proxy
    # A deadline far beyond the stop timeout: only the stop's own grace period can end the hung part.
    settings = settings.replace(request_timeout=120.0)
    sigterm_round(0, random.Random(11), settings, direct, proxy, fork_server, run_dir, hang_a_part=True)


def test_a_second_sigterm_ends_the_grace_period_at_once(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                        fork_server: ForkServer, run_dir: Path) -> None:
    """Ctrl-C twice, or `kill` twice: the operator wants it gone now, not after stop_grace. In-flight work is
    interrupted as at the end of the grace period: nothing is lost, and the next start sends it."""
    settings, direct, proxy = s3_via_proxy
    # The PUT hangs and neither its deadline nor the grace period would end it within this test's timeouts.
    local = settings.replace(spool=run_dir / "spool", request_timeout=600.0, stop_grace=600.0)
    hang = proxy.blackhole(match=H.PUT_OBJECT, times=1)
    entry = enqueue_bytes(local, os.urandom(5000), filename="stuck.bin")
    daemon = fork_server.spawn("run_daemon", env=settings_env(local), log=run_dir / "daemon.log", args=["run"])
    wait_for(lambda: hang.injected, what="the PUT in flight")

    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stop requested" in daemon.log(), what="the first SIGTERM handled")
    assert "up to 600s" in daemon.log()
    time.sleep(0.5)
    assert daemon.poll() is None, "the first SIGTERM must give the hung PUT its grace period"
    daemon.signal(signal.SIGTERM)
    code = daemon.wait(timeout=STOP_TIMEOUT)

    assert code == 0, daemon.log()[-3000:]
    assert "second stop request" in daemon.log() and "Traceback" not in daemon.log(), daemon.log()[-3000:]
    row = entry_rows(local)[entry.id]
    assert row["state"] == State.QUEUED and row["lease_owner"] is None, row
    assert row["attempts"] == 0, "an interrupted upload is not an attempt that failed"
    resume = fork_server.spawn("run_daemon", env=settings_env(local), log=run_dir / "resume.log",
                               args=["run", "--once", "--quiet"])
    assert resume.wait(timeout=120) == 0, resume.log()[-3000:]
    check_invariants(local, [entry], view=direct.replace(spool=local.spool))


def test_a_stop_does_not_wait_for_thread_work_it_cannot_interrupt(settings: Settings, tmp_path: Path) -> None:
    """Judging an object already at an entry's key hashes the whole blob in a thread; a local store's multipart
    completion copies parts in one; neither can be cancelled. `asyncio.run` waited for such threads without a bound
    after the run — a second SIGTERM too. Here the hash takes 60 s: the process must be gone within seconds, with
    the entry back in the queue for the next start."""
    import asyncio
    import subprocess
    import sys

    from mldash.store import make_store
    from mldash.store.base import b64_sha256

    local = settings.replace(part_size=5 * MIB, multipart_threshold=5 * MIB, stop_grace=600.0)
    data = os.urandom(6 * MIB)
    entry = enqueue_bytes(local, data, filename="big.bin")

    async def already_there() -> None:  # an earlier daemon's upload whose commit it never recorded
        async with make_store(local) as store:
            await store.put(store.key(entry.key()), data, b64_sha256(data))

    asyncio.run(already_there())
    slow_hash = ("import sys, time, runpy\n"
                 "import mldash_syncd.upload as upload\n"
                 "upload._whole_digests = lambda *a, **k: time.sleep(60)\n"
                 "sys.argv = ['mldash-syncd', 'run']\n"
                 "runpy.run_module('mldash_syncd', run_name='__main__')\n")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-c", slow_hash], env=settings_env(local), stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "started on" in log.read_text(), what="the daemon started")
        time.sleep(1.0)  # the upload is in its hashing thread now
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: "stop requested" in log.read_text(), what="the first SIGTERM handled")
        daemon.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = daemon.wait(timeout=50)
        took = time.monotonic() - started
    finally:
        daemon.kill()
        daemon.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert took < 30, f"the stop waited {took:.0f}s for the hashing thread"
    assert "exiting without waiting for 1 thread(s) still at work" in text, text[-3000:]
    row = entry_rows(local)[entry.id]
    assert row["state"] == State.QUEUED and row["lease_owner"] is None, row
