"""Scenario 9: the spool on a full filesystem (a 20 MiB tmpfs) — a clear error to the client, nothing
partial, and recovery: the daemon drains the full spool (its own index lives there too), which frees
the space, and saves work again.

Saves go through the public API (`Experiment(...).files(...).save_blob`) until the filesystem is full: the
save that does not fit blocks for save_timeout, then raises SpoolFullError naming what is full and the
setting to change; nothing of it is left behind. Then a daemon (in this process, as `run --once` does)
drains the full spool to a store and catalog on another disk, and everything acknowledged is committed
exactly once. A second round fills the disk while a daemon is running and draining.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mldash import Experiment, SpoolFullError
from mldash.config import Settings
from mldash.spool import SpoolLayout
from mldash_syncd import drain
from tests.reliability.helpers import ServiceThread, all_in, wait_for
from tests.reliability.invariants import acks, check_invariants
from tests.spool_helpers import assert_spool_integrity

MIB = 2**20




def fill(exp: Experiment, size: int, limit: int = 50) -> tuple[list[dict], SpoolFullError]:
    """Save `size`-byte blobs until the spool filesystem refuses one; returns the acknowledged saves and the error."""
    saved = []
    for i in range(limit):
        try:
            saved.append(exp.files("ckpt").save_blob(os.urandom(size), to=f"blob-{time.monotonic_ns()}-{i}.bin"))
        except SpoolFullError as exc:
            return saved, exc
    raise AssertionError(f"{limit} saves of {size} bytes fit on a 20 MiB filesystem")


def assert_clear_error(error: SpoolFullError, spool: Path) -> None:
    message = str(error)
    assert "full" in message and str(spool) in message and "save_timeout" in message, message
    assert "nothing was written" in message, message


def test_full_spool_clear_error_nothing_partial_then_recovery(settings: Settings, small_fs: Path) -> None:
    spool = small_fs / "spool"
    settings = settings.replace(spool=spool, save_timeout=0.5)
    exp = Experiment(prefix="ns/proj/exp", settings=settings)
    layout = SpoolLayout(spool)

    saved, error = fill(exp, 3 * MIB)
    assert len(saved) >= 3, "the filesystem should hold a few entries before it is full"
    assert_clear_error(error, spool)
    assert os.listdir(layout.tmp_dir) == [], "the refused save left a temp file"
    assert_spool_integrity(layout, acknowledged=acks(saved))  # every manifest complete, no blob without one

    report = drain(settings, max_wait=60)  # the daemon must cope with its index on a full disk
    assert report.committed == len(saved) and report.clean, report
    check_invariants(settings, saved)

    again, error = fill(exp, 3 * MIB)  # the space came back
    assert len(again) >= 3
    assert drain(settings, max_wait=60).committed == len(again)
    check_invariants(settings, [*saved, *again])


def test_disk_fills_while_the_daemon_runs(settings: Settings, small_fs: Path) -> None:
    spool = small_fs / "spool"
    # Slow eviction (bytes kept 2 s after commit) so the writer really fills the disk under the daemon.
    # A short lease: an entry whose outcome could not be recorded (index on the full disk) is retried soon.
    settings = settings.replace(spool=spool, save_timeout=0.2, evict_after=2.0, lease_seconds=3.0)
    exp = Experiment(prefix="ns/proj/exp", settings=settings)
    daemon = ServiceThread(settings).start()
    try:
        saved, error = fill(exp, 4 * MIB, limit=200)
        assert_clear_error(error, spool)
        more = []
        deadline = time.monotonic() + 30
        while len(more) < 6 and time.monotonic() < deadline:  # saves succeed again as the daemon frees space
            try:
                more.append(exp.files("ckpt").save_blob(os.urandom(4 * MIB), to=f"later-{len(more)}.bin"))
            except SpoolFullError:
                time.sleep(0.2)
        assert len(more) == 6, "the daemon did not free the full spool"
        ids = [int(s["id"]) for s in [*saved, *more]]
        wait_for(lambda: all_in(settings, ids, ("committed", "evicted")), what="all commits")
    finally:
        report = daemon.stop()
    assert report.clean, report
    check_invariants(settings, [*saved, *more])
