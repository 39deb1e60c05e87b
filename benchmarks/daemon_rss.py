"""Scenario 6 — the daemon's peak memory while draining 1 GiB and 4 GiB into the local store.

The daemon runs as `python -m mldash_syncd run --once --quiet` (a real process, default settings: 8 MiB
parts, 4 in flight), draining one spooled file into a local-directory store with a SQLite catalog. Its RSS
is sampled every 50 ms with psutil; the kernel's own high-water mark (VmHWM in /proc/<pid>/status, which
also catches peaks between samples) is read at every sample too, and the larger of the two is the peak.
"Idle" is the same command draining a single 4 KiB file: the daemon's constant cost (interpreter, imports,
SQLite, the event loop). Invariant 5 of DESIGN.md: memory ≤ constant + in-flight parts, so the peak above
idle must stay within the in-flight budget (max_concurrent_parts × part_size) whatever the file size, plus
a stated 1 MiB for what only a large drain starts (its worker threads' stacks; see ACTIVE_ALLOWANCE_MIB).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import psutil

from benchmarks.context import GIB, MIB, Context, settings_env
from benchmarks.model import ScenarioResult, absolute_row
from benchmarks.stall_torch import _label

NAME = "daemon_rss"
TITLE = "Daemon peak RSS draining one large file into the local store"
SAMPLE_INTERVAL = 0.05
# What a drain of large files touches that a 4 KiB drain does not, besides the part buffers: the stacks of the
# worker threads that read and hash parts (a 4 KiB file is read and hashed on the event loop) and the index's
# rows for the parts. Measured with /proc/<pid>/smaps: ~0.1 MiB of thread stacks, 0.3–0.8 MiB in all.
ACTIVE_ALLOWANCE_MIB = 1.0


def spool_file(settings, size: int) -> None:
    """One entry of `size` bytes (a random 64 MiB block repeated: memory use does not depend on content)."""
    from mldash.spool.enqueue import Enqueuer, EntrySpec

    block = os.urandom(min(size, 64 * MIB))

    def write(sink) -> None:
        left = size
        while left:
            step = min(len(block), left)
            sink.write(memoryview(block)[:step])
            left -= step

    spec = EntrySpec("bench", "rss", "drain", "big", "big.bin", "application/octet-stream", "blob")
    Enqueuer(settings).enqueue(spec, write, expected_size=size)


def _hwm_mib(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def drain_and_sample(ctx: Context, settings) -> dict:
    env = settings_env(settings)
    started = time.perf_counter()
    proc = subprocess.Popen(ctx.daemon_command("run", "--once", "--quiet"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    watched = psutil.Process(proc.pid)
    trace: list[tuple[float, float]] = []
    hwm = 0.0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            trace.append((round(time.perf_counter() - started, 3), round(watched.memory_info().rss / MIB, 1)))
        hwm = max(hwm, _hwm_mib(proc.pid))
        time.sleep(SAMPLE_INTERVAL)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"mldash-syncd run --once exited {proc.returncode}: {stderr[-2000:]}")
    sampled = max((rss for _, rss in trace), default=0.0)
    return {"peak_mib": max(sampled, hwm), "sampled_peak_mib": sampled, "hwm_mib": hwm,
            "seconds": time.perf_counter() - started, "trace": trace}


def run(ctx: Context) -> ScenarioResult:
    sizes = [(32 * MIB, 1), (128 * MIB, 1)] if ctx.quick else [(GIB, 2), (4 * GIB, 1)]
    idle_runs = 1 if ctx.quick else 2
    probe = ctx.settings("probe")
    budget_mib = probe.max_concurrent_parts * probe.part_size / MIB
    ctx.remove(probe.spool.parent)

    idle = []
    for _ in range(idle_runs):
        settings = ctx.settings("idle")
        spool_file(settings, 4096)
        idle.append(drain_and_sample(ctx, settings))
        ctx.remove(settings.spool.parent)
        ctx.log(f"  idle (4 KiB): peak {idle[-1]['peak_mib']:.0f} MiB")
    idle_peak = min(s["peak_mib"] for s in idle)
    result = ScenarioResult(NAME, TITLE, params={
        "sizes_bytes": [s for s, _ in sizes], "store": "local directory", "catalog": "sqlite",
        "part_size_mib": probe.part_size / MIB, "max_concurrent_parts": probe.max_concurrent_parts,
        "in_flight_budget_mib": budget_mib, "idle_peak_mib": idle_peak, "sample_interval_s": SAMPLE_INTERVAL})
    result.samples["idle/trace"] = idle[0]["trace"]
    result.samples["idle/peak_mib"] = [s["peak_mib"] for s in idle]
    for size, runs in sizes:
        label = _label(size)
        peaks = []
        for number in range(runs):
            settings = ctx.settings("rss")
            spool_file(settings, size)
            ctx.settle()
            sample = drain_and_sample(ctx, settings)
            ctx.remove(settings.spool.parent)
            ctx.settle()
            peaks.append(sample["peak_mib"])
            ctx.log(f"  {label}: peak {sample['peak_mib']:.0f} MiB (sampled {sample['sampled_peak_mib']:.0f}, "
                    f"VmHWM {sample['hwm_mib']:.0f}) in {sample['seconds']:.1f} s")
            if number == 0:
                result.samples[f"{label}/trace"] = sample["trace"]
            result.samples[f"{label}/raw"] = [*result.samples.get(f"{label}/raw", []),
                                              {k: v for k, v in sample.items() if k != "trace"}]
        result.samples[f"{label}/peak_mib"] = peaks
        result.rows.append(absolute_row(
            NAME, f"daemon peak RSS above idle, draining {label} (local store)", "memory", "MiB",
            [p - idle_peak for p in peaks], stat="median",
            target=f"≤ in-flight budget ({probe.max_concurrent_parts} × {probe.part_size // MIB} MiB = "
                   f"{budget_mib:.0f} MiB) + {ACTIVE_ALLOWANCE_MIB:.0f} MiB for worker threads",
            op="<=", bound=budget_mib + ACTIVE_ALLOWANCE_MIB,
            baseline="idle daemon peak (4 KiB drain)", baseline_samples=result.samples["idle/peak_mib"],
            note=f"absolute peaks {', '.join(f'{p:.0f}' for p in peaks)} MiB; idle {idle_peak:.0f} MiB"))
    return result
