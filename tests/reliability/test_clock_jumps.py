"""Scenario 11: wall-clock jumps under a running daemon — no stuck entries, no live upload aborted by gc.

The daemon runs as `python -m mldash_syncd` under libfaketime (Debian package `faketime`, installed here
when missing and we are root; otherwise the tests skip): LD_PRELOAD fakes the wall clock from an offset in
a file the test rewrites while the daemon runs (re-read every second), and FAKETIME_DONT_FAKE_MONOTONIC=1
keeps time.monotonic() real, as a clock step by NTP or an admin does. (With that setting libfaketime
0.9.10 breaks absolute clock_nanosleep — Python's time.sleep — which the daemon does not use.)

- +1 day in the middle of a multipart upload, then a kill -9 and a restart still a day ahead: leases,
  start-up gc and the resume must treat the upload as live — one CreateMultipartUpload per file, parts
  stored before the kill never sent again — and everything commits exactly once.
- +1 day while commits are in flight (slowed down at the MongoDB proxy): the daemon's own leases look
  expired, yet each commit runs once (one insert per file) and no task dies.
- -1 hour while entries wait out a store outage (their next attempt is a wall-clock time): once the
  store is back they must go within seconds, not an hour later.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mldash.config import Settings
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import enqueue_bytes, settings_env
from tests.reliability.conftest import MIB
from tests.reliability.helpers import all_in, entry_rows, wait_for
from tests.reliability.invariants import check_invariants

LIB_DIRS = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime",
            "/usr/local/lib/faketime")
DONE = ("committed", "evicted")


def find_libfaketime() -> str | None:
    for directory in LIB_DIRS:
        path = Path(directory) / "libfaketimeMT.so.1"
        if path.exists():
            return str(path)
    return None


@pytest.fixture(scope="session")
def libfaketime() -> str:
    lib = find_libfaketime()
    if lib is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "faketime"], capture_output=True, timeout=300,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        lib = find_libfaketime()
    if lib is None:
        pytest.skip("libfaketime not available (apt-get install faketime, as root)")
    return lib


class FakeClockDaemon:
    """`python -m mldash_syncd <args>` with a wall clock shifted by whatever the offset file says."""

    def __init__(self, settings: Settings, lib: str, offset_file: Path, log: Path, *args: str) -> None:
        env = {**settings_env(settings), "LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(offset_file),
               "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mldash_syncd", *args], env=env, stdout=out,
                                         stderr=out, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def clock(tmp_path: Path) -> Iterator[Path]:
    offset = tmp_path / "faketime-offset"
    offset.write_text("+0\n")
    yield offset


def jump(offset_file: Path, spec: str) -> None:
    offset_file.write_text(spec + "\n")
    time.sleep(1.5)  # the daemon re-reads the offset every second


def test_clock_jumps_a_day_ahead_mid_upload_and_restart(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                        libfaketime: str, clock: Path, tmp_path: Path) -> None:
    settings, direct, proxy = s3_via_proxy
    big = enqueue_bytes(settings, os.urandom(26 * MIB), filename="big.bin")
    small = [enqueue_bytes(settings, os.urandom(5000 + i), filename=f"s{i}.bin") for i in range(4)]
    slow = proxy.delay(0.01, per="chunk", match=H.UPLOAD_PART)  # ~0.8 s per 5 MiB part

    daemon = FakeClockDaemon(settings, libfaketime, clock, tmp_path / "daemon-1.log", "run")
    wait_for(lambda: any(m.target and "partNumber=" in m.target for m in proxy.messages), what="a first part")
    jump(clock, "+1d")
    parts_before_kill = set(stored_parts(proxy))
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

    daemon = FakeClockDaemon(settings, libfaketime, clock, tmp_path / "daemon-2.log", "run")
    try:
        wait_for(lambda: all_in(settings, [big.id, *(s.id for s in small)], DONE), timeout=90, what="all commits")
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    slow.remove()

    creates = [m for m in proxy.messages if m.method == "POST" and m.target and m.target.endswith("?uploads")]
    assert len(creates) == 1, f"{len(creates)} multipart uploads created: the live one was aborted or abandoned"
    sends = [m for m in proxy.messages if m.method == "PUT" and m.target and "partNumber=" in m.target]
    resent = [m for m in sends if m.time > 0 and part_of(m) in parts_before_kill]
    assert len(resent) == len(parts_before_kill), "a part stored before the kill was sent again after the jump"
    assert "Traceback" not in daemon.log()
    check_invariants(settings, [big, *small], view=direct)


def part_of(record) -> int:
    query = record.target.split("?", 1)[1]
    return int(dict(p.split("=", 1) for p in query.split("&"))["partNumber"])


def stored_parts(proxy: FaultProxy) -> list[int]:
    """Part numbers whose UploadPart got a complete 200 answer."""
    return [part_of(m) for m in proxy.messages
            if m.method == "PUT" and m.target and "partNumber=" in m.target and m.complete and m.status == 200]


def test_clock_steps_back_an_hour_while_entries_wait(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                     libfaketime: str, clock: Path, tmp_path: Path) -> None:
    settings, direct, proxy = s3_via_proxy
    down = proxy.refuse()  # the store is unreachable: entries wait for their next attempt (a wall-clock time)
    entries = [enqueue_bytes(settings, os.urandom(3000 + i), filename=f"f{i}.bin") for i in range(5)]
    daemon = FakeClockDaemon(settings, libfaketime, clock, tmp_path / "daemon.log", "run")
    try:
        wait_for(lambda: all((r["error_kind"] == "outage") for r in entry_rows(settings).values())
                 and len(entry_rows(settings)) == len(entries), what="the entries to wait out the outage")
        jump(clock, "-1h")
        down.remove()
        started = time.monotonic()
        wait_for(lambda: all_in(settings, [e.id for e in entries], DONE), timeout=30,
                 what="commits within 30 s of the store's return (an hour-long wait means the step back stuck them)")
        print(f"drained {time.monotonic() - started:.1f}s after the store came back, clock one hour back")
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
    check_invariants(settings, entries, view=direct)


def test_clock_jumps_a_day_ahead_mid_commit(mongo_settings: Settings, mongo_uri: str, fault_proxy,
                                            libfaketime: str, clock: Path, tmp_path: Path) -> None:
    """A lease taken before a +1 day jump looks expired after it: commits in flight must not be claimed and
    run a second time by the same daemon (nor trip over their own finished work)."""
    from tests.faults import mongo_command
    from tests.fixtures.faults import mongo_uri_via

    counter = fault_proxy(mongo_uri, protocol="mongo")
    slow = counter.delay(3.0, per="message", match=mongo_command("insert"))  # commits stay in flight a while
    settings = mongo_settings.replace(catalog=mongo_uri_via(counter, mongo_uri), request_timeout=20.0)
    entries = [enqueue_bytes(settings, os.urandom(2000 + i), filename=f"f{i}.bin") for i in range(4)]
    daemon = FakeClockDaemon(settings, libfaketime, clock, tmp_path / "daemon.log", "run")
    try:
        wait_for(lambda: slow.injected >= 1, what="a commit in flight")
        jump(clock, "+1d")
        wait_for(lambda: all_in(settings, [e.id for e in entries], DONE), timeout=60, what="all commits")
        time.sleep(2.5)  # a duplicate commit would still be running
    finally:
        assert daemon.stop() == 0, daemon.log()[-3000:]
    slow.remove()
    log = daemon.log()
    assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]
    # Commits go in batches, one insert each. A commit that ran twice would send a document again: its insert
    # finds the id present, and the daemon reads the document back — so no read-back at all means none did.
    inserts = sum(1 for m in counter.messages if m.method == "insert")
    reads = sum(1 for m in counter.messages if m.method == "find")
    assert 1 <= inserts <= len(entries) and reads == 0, f"{inserts} inserts, {reads} read-backs: a commit ran twice"
    check_invariants(settings, entries, view=mongo_settings)
