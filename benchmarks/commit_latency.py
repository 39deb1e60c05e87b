"""Scenario 7 — from save to committed, one small file at a time, with an idle daemon (local store).

A daemon runs as a service (`python -m mldash_syncd run`, local-directory store, SQLite catalog) and is left
idle between saves. Each sample: `save_json` of a small dict, then the harness polls the spool index
(read-only SQLite, every 1 ms) until the entry's state is committed (or evicted, which comes after). The
latency runs from the start of the save call to the first poll that sees the commit, so it includes the
save itself, the inotify wake-up, the claim, the verified write into the store, the catalog commit and the
index update; the 1 ms poll adds ≤ 1 ms. Saves are spaced so the daemon is idle (asleep) when each arrives.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time

from benchmarks.context import Context, settings_env
from benchmarks.model import ScenarioResult, absolute_row

NAME = "commit_latency"
TITLE = "Save → committed latency of a small file, idle daemon, local store"
P50_BOUND_MS = 100.0
DONE = {"committed", "evicted"}


def wait_committed(settings, file_id: int, timeout: float = 30.0) -> float:
    """perf_counter() of the first poll that sees the entry committed."""
    from mldash.spool.index import SpoolIndex
    from mldash.spool.layout import SpoolLayout

    deadline = time.monotonic() + timeout
    index = None
    try:
        while time.monotonic() < deadline:
            if index is None:
                index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
            if index is not None:
                try:
                    state = index.states_of([file_id]).get(file_id)
                except sqlite3.OperationalError:  # the daemon is still creating the schema
                    index.close()
                    index = None
                    time.sleep(0.01)
                    continue
                if state is not None and state.value in DONE:
                    return time.perf_counter()
                if state is not None and state.value in ("failed", "quarantined"):
                    raise RuntimeError(f"entry {file_id} ended {state.value}: {index.get(file_id)}")
            time.sleep(0.001)
    finally:
        if index is not None:
            index.close()
    raise TimeoutError(f"entry {file_id} not committed within {timeout}s")


def run(ctx: Context) -> ScenarioResult:
    from mldash import Experiment

    saves, spacing = (8, 0.3) if ctx.quick else (30, 0.5)
    settings = ctx.settings("commit-latency")
    result = ScenarioResult(NAME, TITLE, params={"saves": saves, "spacing_s": spacing, "store": "local directory",
                                                 "catalog": "sqlite", "poll_interval_ms": 1,
                                                 "latency_bounds_ms": [P50_BOUND_MS]})
    handle = Experiment(prefix="bench/commit/latency", settings=settings).files("metrics")
    log_path = settings.spool.parent / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(ctx.daemon_command("run"), env=settings_env(settings), stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for i in range(3):  # warm-up: the daemon's start-up, first store/catalog writes
            saved = handle.save_json({"warmup": i}, to=f"warmup-{i}.json")
            wait_committed(settings, int(saved["id"]), timeout=60)
        latencies, save_calls = [], []
        for i in range(saves):
            time.sleep(spacing)
            started = time.perf_counter()
            saved = handle.save_json({"step": i, "loss": 0.5 / (i + 1)}, to=f"step-{i}.json")
            returned = time.perf_counter()
            committed = wait_committed(settings, int(saved["id"]))
            latencies.append((committed - started) * 1000)
            save_calls.append((returned - started) * 1000)
        ctx.log(f"  save→committed ms: {', '.join(f'{v:.0f}' for v in latencies)}")
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    result.samples["save→committed_ms"] = latencies
    result.samples["save call_ms"] = save_calls
    result.rows.append(absolute_row(NAME, "save_json → committed (idle daemon, local store)", "latency", "ms",
                                    latencies, stat="p50", target=f"p50 ≤ {P50_BOUND_MS:g} ms", op="<=",
                                    bound=P50_BOUND_MS, baseline="the save_json call alone",
                                    baseline_samples=save_calls, shown=("p50", "p95", "max")))
    ctx.remove(settings.spool.parent)
    return result
