"""Scenario 9 — the upload bandwidth cap (`max_upload_rate`): how closely the daemon's wire rate keeps to it.

The daemon (`python -m mldash_syncd run --once`, S3 store, default settings otherwise) drains a 64 MiB
checkpoint (multipart: 8 parts, 4 in flight) and 64 files of 256 KiB to moto through the byte-counting proxy
(benchmarks/proxy.py); a sampler thread reads the proxy's count every 20 ms. Per cap, and per sample:
- rate ÷ cap: the rate from the 10th to the 95th percent of the bytes (`measure`), divided by the cap. It may
  not exceed 1 (HTTP headers, which the cap does not pace, add ~0.1 %), and should not fall far
  below it: a cap that wastes the bandwidth it allows is no good either.
- peak ÷ cap: the most bytes seen in any 250 ms window, over 250 ms of the cap — how bursty the stream is.
  The bucket's credit (a tenth of a second at the cap) allows at most 1.4 in one window.
The baseline is the same drain without a cap, in the same run: the rate moto takes on this machine, which must
be well above the caps for their measurement to mean anything (it is reported beside them).
"""

from __future__ import annotations

import itertools
import os
import threading
import time

from benchmarks.context import MIB, Context
from benchmarks.model import ScenarioResult, absolute_row
from benchmarks.proxy import CountingProxy
from benchmarks.stats import interleave

NAME = "upload_cap"
TITLE = "Upload bandwidth cap: the daemon's wire rate against max_upload_rate (S3, through a counting proxy)"
CAPS_MIB = (16, 48)
WINDOW = 0.25    # seconds: the window of the peak
INTERVAL = 0.02  # seconds between samples of the proxy's count
RATE_BOUND = 1.02  # headers are not paced; anything more is the cap leaking
USE_BOUND = 0.90   # below this the cap wastes bandwidth it allows
PEAK_BOUND = 1.5   # 1 + the bucket's credit (0.1 s of the cap) per 0.25 s window, + sampling slack


def spool_drain_set(settings, big: int, small_count: int) -> int:
    from mldash.spool.enqueue import Enqueuer, EntrySpec

    enqueuer = Enqueuer(settings)
    total = 0
    for i, size in enumerate([big] + [256 << 10] * small_count):
        data = os.urandom(size)
        spec = EntrySpec("bench", "cap", "run", "ckpt", f"f{i}.bin", "application/octet-stream", "blob")
        enqueuer.enqueue(spec, lambda sink, data=data: sink.write(data), expected_size=size)
        total += size
    return total


class Sampler:
    """(time, bytes up) every INTERVAL seconds on a thread of its own."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.trace: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cap-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.trace.append((time.perf_counter(), self.proxy.bytes_up()))
            time.sleep(INTERVAL)


def measure(trace: list[tuple[float, int]]) -> tuple[float, float, float]:
    """(bytes per second while the 10th to the 95th percent of the bytes went up, the most bytes per second in
    any WINDOW, the seconds of that stretch) of a sampled byte count. Not from the first byte: the first ones
    ride on the bucket's credit (up to 6 % of the bytes here); not to the last: the last count changes wait
    for moto to take in the last parts before the daemon completes the upload. Neither is the pace."""
    total = trace[-1][1]
    low, high = _time_at(trace, 0.10 * total), _time_at(trace, 0.95 * total)
    rate = 0.85 * total / (high - low)
    peak = 0.0
    j = 0
    for i in range(len(trace)):  # windows of at least WINDOW, measured by their samples' own times
        while j < len(trace) - 1 and trace[j][0] - trace[i][0] < WINDOW:
            j += 1
        if trace[j][0] - trace[i][0] >= WINDOW:
            peak = max(peak, (trace[j][1] - trace[i][1]) / (trace[j][0] - trace[i][0]))
    return rate, peak, high - low


def _time_at(trace: list[tuple[float, int]], count: float) -> float:
    """When the sampled count reached `count` (linear between the two samples around it)."""
    for (t0, c0), (t1, c1) in itertools.pairwise(trace):
        if c1 >= count:
            return t0 + (t1 - t0) * (count - c0) / (c1 - c0) if c1 > c0 else t1
    return trace[-1][0]


def run(ctx: Context) -> ScenarioResult:
    big, small_count, rounds = (16 * MIB, 16, 1) if ctx.quick else (64 * MIB, 64, 3)
    moto = ctx.moto()
    bucket = "bench-upload-cap"
    moto.create_bucket(bucket)
    result = ScenarioResult(NAME, TITLE, params={"checkpoint_bytes": big, "small_files": small_count,
                                                 "small_file_bytes": 256 << 10, "caps_mib_s": list(CAPS_MIB),
                                                 "rounds": rounds, "window_s": WINDOW, "sample_interval_s": INTERVAL})
    with CountingProxy(moto.port) as proxy:
        def drain(cap_mib: int | None) -> dict:
            overrides = {"max_upload_rate": cap_mib * MIB} if cap_mib else {}
            settings = ctx.settings(f"cap-{cap_mib or 'none'}", store="s3", bucket=bucket, endpoint_url=proxy.url,
                                    **overrides)
            payload = spool_drain_set(settings, big, small_count)
            ctx.settle()
            proxy.reset()
            with Sampler(proxy) as sampler:
                done = ctx.run_daemon(settings, "run", "--once", "--quiet")
            if done.returncode != 0:
                raise RuntimeError(f"drain with cap {cap_mib} failed ({done.returncode}): {done.stderr[-2000:]}")
            up, _ = proxy.reset()
            ctx.remove(settings.spool.parent)
            moto.empty_bucket(bucket)
            rate, peak, seconds = measure(sampler.trace)
            return {"rate": rate, "peak": peak, "seconds": seconds, "wire_bytes": up, "payload_bytes": payload,
                    "trace": [(t - sampler.trace[0][0], n) for t, n in sampler.trace]}

        variants = {f"cap {cap} MiB/s": (lambda cap=cap: drain(cap)) for cap in CAPS_MIB}
        variants["no cap"] = lambda: drain(None)
        samples = interleave(rounds, variants, log=ctx.log)

    uncapped = [s["rate"] / MIB for s in samples["no cap"]]
    result.samples["no cap/rate"] = uncapped
    for cap in CAPS_MIB:
        name = f"cap {cap} MiB/s"
        runs = samples[name]
        ratios = [s["rate"] / (cap * MIB) for s in runs]
        peaks = [s["peak"] / (cap * MIB) for s in runs]
        result.samples[f"{name}/rate_ratio"] = ratios
        result.samples[f"{name}/peak_ratio"] = peaks
        result.samples[f"{name}/trace"] = runs[-1]["trace"]
        result.rows.append(absolute_row(
            NAME, f"{name}: wire rate ÷ cap", "rate ÷ cap", "×", ratios, stat="max",
            target=f"≤ {RATE_BOUND}", op="<=", bound=RATE_BOUND, shown=("p50", "max"),
            note=f"uncapped, the same drain went at {min(uncapped):.0f}–{max(uncapped):.0f} MiB/s"))
        result.rows.append(absolute_row(
            NAME, f"{name}: share of the cap used", "rate ÷ cap", "×", ratios, stat="min",
            target=f"≥ {USE_BOUND}", op=">=", bound=USE_BOUND, shown=("p50", "min")))
        result.rows.append(absolute_row(
            NAME, f"{name}: busiest {int(WINDOW * 1000)} ms ÷ cap", "peak ÷ cap", "×", peaks, stat="max",
            target=f"≤ {PEAK_BOUND}", op="<=", bound=PEAK_BOUND, shown=("p50", "max")))
    return result
