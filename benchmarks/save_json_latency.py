"""Scenario 3 — latency of small saves with 1 and 8 writer processes sharing one spool.

Writers are real processes (multiprocessing "spawn": a fresh interpreter each, as DDP ranks are), all
saving into the same spool. Each writer times three kinds of call, one kind after the other (the order
rotates from round to round), all writers starting each kind together on a barrier:
- `save_json` — the public API: `exp.files("metrics").save_json({...}, to=...)` (~100-byte JSON);
- `enqueue`   — the spool's raw write path, `Enqueuer.enqueue` of 100 bytes (issue 2's enqueue latency);
- `plain write` — context, not judged: what a user would otherwise do, write the JSON to a new local file
  and rename it into place (no hash, no manifest).

Two load patterns:
- *synchronized*: every round starts all writers at once on a barrier, each makes one call — "8 processes
  saving at once", which is what the target speaks of;
- *back-to-back*: every writer calls in a tight loop after one common start — a stress test of pure
  contention (8 busy processes on this machine's cores), reported as context.
No daemon runs: this is the client's cost alone.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.context import Context
from benchmarks.model import ScenarioResult, absolute_row
from benchmarks.stats import summary

NAME = "save_json_latency"
TITLE = "Small save latency (save_json, raw enqueue) with 1 and 8 writer processes"
P99_BOUND_MS = 5.0
KINDS = ("save_json", "enqueue", "plain write")


def _writer(rank: int, settings: Any, plain_dir: str, kinds: list[str], calls: int, pattern: str,
            barrier: Any, out: Any) -> None:
    """One writer process: for each kind in turn, warm up, then `calls` timed calls; sends back ms latencies."""
    from mldash import Experiment
    from mldash.spool.enqueue import Enqueuer, EntrySpec

    exp = Experiment(prefix="bench/json/latency", settings=settings)
    handle = exp.files("metrics")
    enqueuer = Enqueuer(settings)
    spec = EntrySpec("bench", "json", "latency", "raw", "e.bin", "application/octet-stream", "blob")
    blob = os.urandom(100)
    record = {"rank": rank, "step": 0, "loss": 0.1234, "acc": 0.9, "lr": 3e-4, "tags": ["a", "b"]}

    def call(kind: str, i: int) -> None:
        if kind == "save_json":
            record["step"] = i
            handle.save_json(record, to=f"r{rank}-{i}.json")
        elif kind == "enqueue":
            enqueuer.enqueue(spec, lambda sink: sink.write(blob), expected_size=len(blob))
        else:
            path = Path(plain_dir) / f"r{rank}-{i}.json"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as handle_:
                json.dump(record, handle_)
            os.replace(tmp, path)

    results: dict[str, list[float]] = {}
    for kind in kinds:
        for i in range(5):  # first-call costs (imports, first file in a directory): not what we measure
            call(kind, -1 - i)
        latencies = []
        barrier.wait()  # every writer starts this kind together
        for i in range(calls):
            if pattern == "synchronized":
                barrier.wait()
            started = time.perf_counter_ns()
            call(kind, i)
            latencies.append((time.perf_counter_ns() - started) / 1e6)
        results[kind] = latencies
    out.put((rank, results))


def measure(settings: Any, plain_dir: Path, kinds: list[str], writers: int, calls: int,
            pattern: str) -> dict[str, list[float]]:
    """Start `writers` spawned processes, run every kind in them (in the given order); pooled latencies."""
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(writers)
    out = mp.Queue()
    procs = [mp.Process(target=_writer, args=(rank, settings, str(plain_dir), kinds, calls, pattern, barrier, out))
             for rank in range(writers)]
    for proc in procs:
        proc.start()
    pooled: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for _ in procs:
            _rank, values = out.get(timeout=300)
            for kind, latencies in values.items():
                pooled[kind].extend(latencies)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return pooled


def run(ctx: Context) -> ScenarioResult:
    from benchmarks.context import clear_spool

    calls = 40 if ctx.quick else 250
    rounds = 1 if ctx.quick else 2
    writer_counts = (1, 8)
    patterns = ("synchronized",) if ctx.quick else ("synchronized", "back-to-back")
    result = ScenarioResult(NAME, TITLE, params={"calls_per_writer_per_round": calls, "rounds": rounds,
                                                 "writers": list(writer_counts), "patterns": list(patterns),
                                                 "cpu_count": os.cpu_count(), "latency_bounds_ms": [P99_BOUND_MS]})
    settings = ctx.settings("json-latency")
    plain_dir = ctx.fresh_dir("plain")
    for pattern in patterns:
        for writers in writer_counts:
            pooled: dict[str, list[float]] = {kind: [] for kind in KINDS}
            if not ctx.quick:  # warm-up round, dropped: grows the spool directories, faults in memory
                measure(settings, plain_dir, list(KINDS), writers, calls // 5, pattern)
                clear_spool(settings)
                for path in plain_dir.iterdir():
                    path.unlink()
            for number in range(rounds):
                shift = number % len(KINDS)  # rotate which kind goes first in each round
                measured = measure(settings, plain_dir, list(KINDS[shift:] + KINDS[:shift]), writers, calls, pattern)
                for kind, values in measured.items():
                    pooled[kind].extend(values)
                    stats = summary(values)
                    ctx.log(f"  {pattern} {writers} writer(s) {kind}: p50 {stats['p50']:.3f} ms, p99 "
                            f"{stats['p99']:.3f} ms, max {stats['max']:.2f} ms (n={stats['n']})")
                clear_spool(settings)
                for path in plain_dir.iterdir():
                    path.unlink()
            for kind in KINDS:
                result.samples[f"{pattern}, {writers}w, {kind}_ms"] = pooled[kind]
            for kind in ("save_json", "enqueue"):
                bounded = pattern == "synchronized" and writers == 8
                result.rows.append(absolute_row(
                    NAME, f"{kind}, {writers} writer{'s' if writers > 1 else ''} ({pattern})", "latency", "ms",
                    pooled[kind], stat="p99", target=f"p99 ≤ {P99_BOUND_MS:g} ms" if bounded else None,
                    op="<=" if bounded else None, bound=P99_BOUND_MS if bounded else None,
                    baseline="plain write+rename", baseline_samples=pooled["plain write"]))
    ctx.remove(settings.spool.parent)
    ctx.remove(plain_dir)
    return result
