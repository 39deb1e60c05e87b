"""Scenario 6 — the daemon's peak memory while draining 1 GiB and 4 GiB into the local store.

The daemon runs as `python -m mldash_syncd run --once --quiet` (a real process, default settings: 8 MiB
parts, 4 in flight), draining one spooled file into a local-directory store with a SQLite catalog. Every
20 ms its RSS is sampled with psutil and the kernel's high-water mark (VmHWM in /proc/<pid>/status, which
also catches peaks between samples) is read; the larger of the two is the peak. The same reads split RSS
into anonymous pages (RssAnon + RssShmem: heap, part buffers, stacks) and file-backed ones (RssFile: interpreter and
library code), reported beside the judged figure to show where a change came from.
"Idle" is the same command draining a single 4 KiB file: the daemon's constant cost (interpreter, imports,
SQLite, the event loop); 3 runs, and their median is the reference — the least of a few would bias the
difference up (in one full run the lower of two idle runs came out 1.1 MiB below all others, as large as the
allowance). Invariant 5 of DESIGN.md: memory ≤ constant + in-flight parts, so the peak above idle must stay
within the in-flight budget (max_concurrent_parts × part_size) whatever the file size, plus a stated 1 MiB
for what only a large drain starts (its worker threads' stacks; see ACTIVE_ALLOWANCE_MIB).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path

import psutil

from benchmarks.context import GIB, MIB, Context, settings_env
from benchmarks.model import ScenarioResult, absolute_row
from benchmarks.stall_torch import _label

NAME = "daemon_rss"
TITLE = "Daemon peak RSS draining one large file into the local store"
SAMPLE_INTERVAL = 0.02
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


def _status_mib(pid: int) -> dict[str, float]:
    """VmHWM (the kernel's high-water mark of RSS), RssAnon, RssShmem (shared anonymous memory: `mmap.mmap(-1,
    n)` without MAP_PRIVATE, /dev/shm) and RssFile from /proc/<pid>/status, in MiB."""
    fields = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssShmem", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def drain_and_sample(ctx: Context, settings) -> dict:
    env = settings_env(settings)
    started = time.perf_counter()
    proc = subprocess.Popen(ctx.daemon_command("run", "--once", "--quiet"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    watched = psutil.Process(proc.pid)
    trace: list[tuple[float, float]] = []
    hwm = anon = file_at_anon_peak = 0.0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            trace.append((round(time.perf_counter() - started, 3), round(watched.memory_info().rss / MIB, 1)))
        status = _status_mib(proc.pid)
        hwm = max(hwm, status.get("VmHWM", 0.0))
        if (private := status.get("RssAnon", 0.0) + status.get("RssShmem", 0.0)) > anon:
            anon, file_at_anon_peak = private, status.get("RssFile", 0.0)
        time.sleep(SAMPLE_INTERVAL)
    stderr = ""
    if proc.stderr:
        with proc.stderr:
            stderr = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"mldash-syncd run --once exited {proc.returncode}: {stderr[-2000:]}")
    sampled = max((rss for _, rss in trace), default=0.0)
    return {"peak_mib": max(sampled, hwm), "sampled_peak_mib": sampled, "hwm_mib": hwm, "anon_peak_mib": anon,
            "file_at_anon_peak_mib": file_at_anon_peak, "seconds": time.perf_counter() - started, "trace": trace}


def judged_peak(sample: dict) -> float:
    """The figure judged against idle: the whole RSS peak — anonymous, shared and file-backed pages, and a peak
    between two samples (VmHWM keeps it)."""
    return sample["peak_mib"]


def _describe(sample: dict) -> str:
    return (f"peak RSS {sample['peak_mib']:.1f} MiB (sampled {sample['sampled_peak_mib']:.1f}, VmHWM "
            f"{sample['hwm_mib']:.1f}); anonymous {sample['anon_peak_mib']:.1f} MiB (+ file-backed "
            f"{sample['file_at_anon_peak_mib']:.1f}) in {sample['seconds']:.1f} s")


def _anonymous_note(samples: list[dict], idle_anon: float) -> str:
    peaks = [s["anon_peak_mib"] for s in samples]
    return (f"anonymous RSS: peaks {', '.join(f'{p:.1f}' for p in peaks)} MiB, idle {idle_anon:.1f} MiB "
            f"({', '.join(f'{p - idle_anon:.1f}' for p in peaks)} above it)")


def run(ctx: Context) -> ScenarioResult:
    sizes = [(32 * MIB, 1), (128 * MIB, 1)] if ctx.quick else [(GIB, 2), (4 * GIB, 1)]
    idle_runs = 1 if ctx.quick else 3
    probe = ctx.settings("probe")
    budget_mib = probe.max_concurrent_parts * probe.part_size / MIB
    ctx.remove(probe.spool.parent)

    idle = []
    for _ in range(idle_runs):
        settings = ctx.settings("idle")
        spool_file(settings, 4096)
        idle.append(drain_and_sample(ctx, settings))
        ctx.remove(settings.spool.parent)
        ctx.log(f"  idle (4 KiB): {_describe(idle[-1])}")
    # The median, as on the other side: the least of a few noisy references would bias the difference up.
    idle_peak = statistics.median(judged_peak(s) for s in idle)
    idle_anon = statistics.median(s["anon_peak_mib"] for s in idle)
    result = ScenarioResult(NAME, TITLE, params={
        "sizes_bytes": [s for s, _ in sizes], "store": "local directory", "catalog": "sqlite",
        "part_size_mib": probe.part_size / MIB, "max_concurrent_parts": probe.max_concurrent_parts,
        "in_flight_budget_mib": budget_mib, "idle_peak_mib": idle_peak, "idle_anon_peak_mib": idle_anon,
        "sample_interval_s": SAMPLE_INTERVAL})
    result.samples["idle/trace"] = idle[0]["trace"]
    result.samples["idle/peak_mib"] = [s["peak_mib"] for s in idle]
    result.samples["idle/anon_peak_mib"] = [s["anon_peak_mib"] for s in idle]
    for size, runs in sizes:
        label = _label(size)
        samples = []
        for number in range(runs):
            settings = ctx.settings("rss")
            spool_file(settings, size)
            ctx.settle()
            sample = drain_and_sample(ctx, settings)
            ctx.remove(settings.spool.parent)
            ctx.settle()
            samples.append(sample)
            ctx.log(f"  {label}: {_describe(sample)}")
            if number == 0:
                result.samples[f"{label}/trace"] = sample["trace"]
        result.samples[f"{label}/raw"] = [{k: v for k, v in s.items() if k != "trace"} for s in samples]
        result.samples[f"{label}/peak_mib"] = [s["peak_mib"] for s in samples]
        result.samples[f"{label}/anon_peak_mib"] = [s["anon_peak_mib"] for s in samples]
        result.rows.append(absolute_row(
            NAME, f"daemon peak RSS above idle, draining {label} (local store)", "memory", "MiB",
            [judged_peak(s) - idle_peak for s in samples], stat="median",
            target=f"≤ in-flight budget ({probe.max_concurrent_parts} × {probe.part_size // MIB} MiB = "
                   f"{budget_mib:.0f} MiB) + {ACTIVE_ALLOWANCE_MIB:.0f} MiB for worker threads",
            op="<=", bound=budget_mib + ACTIVE_ALLOWANCE_MIB,
            baseline="idle daemon peak (4 KiB drain)", baseline_samples=result.samples["idle/peak_mib"],
            note=_anonymous_note(samples, idle_anon)))
    return result
