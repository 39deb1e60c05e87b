"""Scenario 1: kill -9 of the training process at random points during saves, end to end.

Each iteration forks a writer that saves through the public API (`Experiment(...).files("ckpt")`:
save_blob, save_json, save_text, upload of a file; small and multi-MB) and records every acknowledgement,
while a daemon (`mldash-syncd run`) drains the same spool. The writer is SIGKILLed after a random delay
(in the middle of a serialization, a copy, between the blob and the manifest link, …); the daemon is
then stopped with SIGTERM, a fresh `run --once` drain finishes the queue, and the invariants are checked:
every acknowledged save is in the store and the catalog exactly once with its bytes, nothing half-saved
was uploaded, nothing is stuck.

CI runs 30 iterations here: the ≥ 200-iteration kill -9 loop of the enqueue protocol itself (with kills
at exact steps of the commit protocol) is tests/test_spool_crash.py; this one adds the daemon and the
backends to the picture.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash_syncd import drain
from tests.fixtures.daemon import settings_env
from tests.reliability.conftest import loop_count
from tests.reliability.forkserver import ForkServer
from tests.reliability.helpers import wait_for
from tests.reliability.invariants import acks, check_invariants
from tests.spool_helpers import Ack


def read_acks(path: Path) -> dict[int, Ack]:
    if not path.exists():
        return {}
    return acks(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def kill_client_loop(settings: Settings, fork_server: ForkServer, base: Path, count: int, seed: int,
                     checksum: str = "sync") -> None:
    rng = random.Random(seed)
    acked_total = unacked_total = 0
    for i in range(count):
        run = base / f"run-{i}"
        run.mkdir()
        local = settings.replace(spool=run / "spool", store=(run / "store").as_uri(),
                                 catalog="sqlite://" + str(run / "catalog.sqlite"), checksum=checksum)
        env = settings_env(local)
        daemon = fork_server.spawn("run_daemon", env=env, log=run / "daemon.log", args=["run"])
        ack_path = run / "acks.jsonl"
        writer = fork_server.spawn("write_loop", env=env, log=run / "writer.log", ack_path=str(ack_path),
                                   experiment="ns/proj/exp", seed=seed * 1000 + i)
        # Random point in the writer's life: mostly mid-stream, sometimes before its first save returns.
        try:
            writer.wait(timeout=rng.uniform(0.02, 0.6))
            raise AssertionError(f"writer exited on its own:\n{writer.log()}")
        except TimeoutError:
            writer.kill()
        assert writer.wait() == -signal.SIGKILL
        # Its SIGTERM handler is in place once it says it started (the writer can be killed sooner than that).
        wait_for(lambda d=daemon: "started on" in d.log() or d.poll() is not None, what="the daemon's start")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, daemon.log()[-3000:]

        report = drain(local, max_wait=60)
        acked = read_acks(ack_path)
        # A writer killed between its two links leaves a blob without manifest: recovery keeps it for a
        # grace period (it may be a live writer's), then removes it.
        result = check_invariants(local, acked, allow_orphan_blobs=True)
        assert report.clean, report
        acked_total += len(acked)
        unacked_total += len(result.rows) - len(acked)  # committed, but the kill came before the ack
    # The loop must have exercised something: saves acknowledged, and kills that landed mid-save.
    assert acked_total >= count, f"only {acked_total} saves acknowledged in {count} iterations"
    print(f"kill -9 of the client ({checksum} checksums): {count} kills, {acked_total} acknowledged saves verified, "
          f"{unacked_total} committed-but-unacknowledged")


@pytest.mark.timeout(600)  # scales with --iterations
def test_kill9_client_during_saves(settings: Settings, fork_server: ForkServer, run_dir: Path,
                                   request: pytest.FixtureRequest) -> None:
    kill_client_loop(settings, fork_server, run_dir, loop_count(request, 30), seed=1)


def test_kill9_client_during_saves_deferred_checksums(settings: Settings, fork_server: ForkServer, run_dir: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """MLDASH_CHECKSUM=deferred: saves return without a checksum; the daemon computes it from the spooled
    bytes — which must still be exactly what the save call had."""
    kill_client_loop(settings, fork_server, run_dir, loop_count(request, 10), seed=3, checksum="deferred")


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_kill9_client_during_saves_long(settings: Settings, fork_server: ForkServer, run_dir: Path,
                                        request: pytest.FixtureRequest) -> None:
    kill_client_loop(settings, fork_server, run_dir, loop_count(request, 30), seed=2)
