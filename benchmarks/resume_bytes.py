"""Scenario 8 — bytes sent again after a kill -9 of the daemon halfway through a 1 GiB multipart upload.

The daemon (`python -m mldash_syncd run`, default settings: 8 MiB parts, 4 in flight) talks to moto through
a byte-counting TCP proxy (benchmarks/proxy.py), so every byte on the wire is counted, headers included.
1. Reference: the same file drained without a crash (`run --once`): wire bytes − file size = the protocol
   overhead of a clean upload (HTTP headers, list/head/complete calls).
2. Crash run: the daemon is SIGKILLed once the proxy has seen half the file plus half a part go up (so the
   kill lands mid-body, not at a part boundary); the parts moto holds are listed directly (not through the
   proxy); then `run --once` finishes the upload.
Re-sent bytes = (wire bytes of both runs − file size) − the clean run's overhead: what the crash cost.
Target (issue 4): at most the parts that were in flight, i.e. max_concurrent_parts × part_size.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from benchmarks.context import GIB, MIB, Context, settings_env
from benchmarks.model import ScenarioResult, absolute_row
from benchmarks.proxy import CountingProxy
from benchmarks.stall_torch import _label

NAME = "resume_bytes"
TITLE = "Bytes re-sent after kill -9 of the daemon at ~50% of a multipart upload"


def spool_random(settings, size: int) -> int:
    from mldash.spool.enqueue import Enqueuer, EntrySpec

    def write(sink) -> None:
        left = size
        while left:
            step = min(64 * MIB, left)
            sink.write(os.urandom(step))
            left -= step

    spec = EntrySpec("bench", "resume", "kill9", "big", "big.bin", "application/octet-stream", "blob")
    return Enqueuer(settings).enqueue(spec, write, expected_size=size).id


def index_row(settings, file_id: int) -> tuple[dict, int]:
    from mldash.spool.index import SpoolIndex
    from mldash.spool.layout import SpoolLayout

    index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
    if index is None:
        return {}, 0
    try:
        return index.get(file_id) or {}, len(index.parts(file_id))
    finally:
        index.close()


def run(ctx: Context) -> ScenarioResult:
    size = 64 * MIB if ctx.quick else GIB
    label = _label(size)
    moto = ctx.moto()
    bucket = "bench-resume"
    moto.create_bucket(bucket)
    with CountingProxy(moto.port) as proxy:
        probe = ctx.settings("probe", store="s3", bucket=bucket, endpoint_url=proxy.url)
        part, in_flight = probe.part_size, probe.max_concurrent_parts
        ctx.remove(probe.spool.parent)
        bound = in_flight * part
        result = ScenarioResult(NAME, TITLE, params={"size_bytes": size, "part_size_mib": part / MIB,
                                                     "max_concurrent_parts": in_flight,
                                                     "in_flight_bound_mib": bound / MIB,
                                                     "kill_after_bytes": "size/2 + part_size/2"})

        # 1. clean reference run: the protocol overhead of one upload of this size
        settings = ctx.settings("resume-ref", store="s3", bucket=bucket, endpoint_url=proxy.url)
        spool_random(settings, size)
        proxy.reset()
        done = ctx.run_daemon(settings, "run", "--once", "--quiet")
        if done.returncode != 0:
            raise RuntimeError(f"reference run failed ({done.returncode}): {done.stderr[-2000:]}")
        reference_up, _ = proxy.reset()
        overhead = reference_up - size
        ctx.log(f"  clean upload of {label}: {reference_up} bytes up, overhead {overhead} bytes")
        ctx.remove(settings.spool.parent)
        moto.empty_bucket(bucket)

        # 2. crash at ~50 %, then resume
        settings = ctx.settings("resume", store="s3", bucket=bucket, endpoint_url=proxy.url)
        file_id = spool_random(settings, size)
        ctx.settle()
        proxy.reset()
        daemon = subprocess.Popen(ctx.daemon_command("run"), env=settings_env(settings), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        # Half the file plus half a part: the kill lands while part bodies are on the wire, not at a boundary.
        kill_at = size // 2 + part // 2
        while proxy.bytes_up() < kill_at:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon exited ({daemon.returncode}) or stalled before 50% was sent")
            time.sleep(0.002)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        time.sleep(0.2)  # let the proxy count what was already on its way
        first_up, _ = proxy.reset()
        row, recorded = index_row(settings, file_id)
        held = moto.client().list_parts(Bucket=bucket, Key=row["store_key"], UploadId=row["upload_id"])
        held_parts = held.get("Parts", [])
        held_bytes = sum(p["Size"] for p in held_parts)
        sent_before = row.get("bytes_sent") or 0
        ctx.log(f"  killed at {first_up / MIB:.0f} MiB sent: moto holds {len(held_parts)} parts "
                f"({held_bytes / MIB:.0f} MiB), the index recorded {recorded}")

        done = ctx.run_daemon(settings, "run", "--once", "--quiet")
        if done.returncode != 0:
            raise RuntimeError(f"resume run failed ({done.returncode}): {done.stderr[-2000:]}")
        second_up, _ = proxy.reset()
        after, _ = index_row(settings, file_id)
        if after.get("state") not in ("committed", "evicted"):
            raise RuntimeError(f"entry not committed after the resume: {after}")
        ctx.remove(settings.spool.parent)
        moto.empty_bucket(bucket)

    extra = first_up + second_up - size
    resent = extra - overhead
    lost_in_flight = first_up - held_bytes
    second_beyond_missing = second_up - (size - held_bytes)
    raw = {"file_bytes": size, "reference_up": reference_up, "reference_overhead": overhead,
           "crash_run_up": first_up, "resume_run_up": second_up, "held_parts": len(held_parts),
           "held_bytes": held_bytes, "recorded_parts_in_index": recorded,
           "index_bytes_sent_before_kill": sent_before, "index_bytes_sent_after": after.get("bytes_sent"),
           "extra_wire_bytes": extra, "resent_bytes": resent, "lost_in_flight_bytes": lost_in_flight,
           "resume_bytes_beyond_missing_parts": second_beyond_missing}
    result.samples["raw"] = raw
    result.rows.append(absolute_row(
        NAME, f"bytes re-sent after kill -9 at 50% of {label}", "re-sent", "MiB", [max(resent, 0) / MIB], stat="median",
        target=f"≤ in-flight parts × part size ({in_flight} × {part // MIB} MiB = {bound // MIB} MiB)", op="<=",
        bound=bound / MIB,
        note=(f"killed after {first_up / MIB:.1f} MiB on the wire; moto held {len(held_parts)} complete parts "
              f"({held_bytes / MIB:.0f} MiB), so {lost_in_flight / MIB:.1f} MiB of in-flight parts were lost; the "
              f"resume sent {second_up / MIB:.1f} MiB for {(size - held_bytes) / MIB:.0f} MiB missing "
              f"(+{second_beyond_missing / 2**10:.0f} KiB); a clean upload's protocol overhead is "
              f"{overhead / 2**10:.0f} KiB"
              # The estimate subtracts one clean run's request headers from two runs' worth: it is good to a few
              # KiB either way, and a kill that cost (almost) nothing can come out slightly below zero.
              + (f"; the estimate came out at {resent / 2**10:+.1f} KiB (headers of the two runs differ by a few "
                 "KiB), shown as 0" if resent < 0 else ""))))
    return result
