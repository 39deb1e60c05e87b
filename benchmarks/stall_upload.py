"""Scenario 2 — the stall of `upload(path)` against a plain copy of the same file.

Subject: `exp.files("data").upload(src)` with the default settings — copy the file into the spool and
return. The default checksum mode, "auto", hashes files up to 64 MiB on the way; larger ones are a bare
copy_file_range into the spool and the daemon computes their SHA256.
Baselines: `shutil.copyfile(src, dst)` (Python's own copy: sendfile on Linux) and `cp src dst` in a subprocess.
The source is random bytes on the same filesystem, read once before measuring so every variant reads it from
the page cache. After every sample the copy/spool entry is deleted and dirty pages are flushed.
Context rows (not judged), interleaved in the same rounds: the same call with MLDASH_CHECKSUM=sync (hashing
at every size, the digest returned by the call) and =deferred, against shutil.copyfile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.context import GIB, MIB, Context
from benchmarks.model import ScenarioResult, ratio_row
from benchmarks.stall_torch import _label, timed_save
from benchmarks.stats import interleave

NAME = "stall_upload"
TITLE = "Stall of upload(path) vs a plain file copy"
TARGET = 1.1


def make_random_file(path: Path, size: int, chunk: int = 64 * MIB) -> None:
    with open(path, "wb") as handle:
        left = size
        while left:
            step = min(chunk, left)
            handle.write(os.urandom(step))
            left -= step


def run(ctx: Context) -> ScenarioResult:
    from mldash import Experiment

    sizes = [(4 * MIB, 3), (32 * MIB, 2)] if ctx.quick else [(100 * MIB, 5), (GIB, 4)]
    result = ScenarioResult(NAME, TITLE, params={"sizes_bytes": [s for s, _ in sizes],
                                                 "rounds": {str(s): n for s, n in sizes}})
    settings = ctx.settings("stall-upload")
    work = ctx.fresh_dir("copies")
    modes = ("auto", "sync", "deferred")  # "auto" is the default; same spool, same filesystem for all
    handles = {mode: Experiment(prefix="bench/stall/upload", settings=settings.replace(checksum=mode)).files("data")
               for mode in modes}

    for size, rounds in sizes:
        label = _label(size)
        source = work / f"source-{label.replace(' ', '')}.bin"
        make_random_file(source, size)
        ctx.settle()
        with open(source, "rb") as warm:  # into the page cache, for every variant alike
            while warm.read(64 * MIB):
                pass
        target = work / "copy.bin"
        ctx.log(f"  {label} file, {rounds} rounds")

        def subject(mode: str, source=source) -> Callable[[], float]:
            return lambda: timed_save(settings, mode, lambda: handles[mode].upload(source, to="data.bin"))

        def copyfile(source=source, target=target) -> float:
            started = time.perf_counter()
            shutil.copyfile(source, target)
            elapsed = time.perf_counter() - started
            target.unlink()
            return elapsed

        def cp(source=source, target=target) -> float:
            started = time.perf_counter()
            subprocess.run(["cp", str(source), str(target)], check=True)
            elapsed = time.perf_counter() - started
            target.unlink()
            return elapsed

        variants = {"upload": subject("auto"), "upload_sync": subject("sync"), "upload_deferred": subject("deferred"),
                    "copyfile": copyfile, "cp": cp}
        interleave(1, variants, between=ctx.settle)  # warm-up, dropped
        samples = interleave(rounds, variants, between=ctx.settle, log=ctx.log)
        for name, values in samples.items():
            result.samples[f"{label}/{name}_s"] = values
        for name, text in (("copyfile", "shutil.copyfile"), ("cp", "cp (subprocess)")):
            result.rows.append(ratio_row(NAME, f"upload(path) {label} (default: checksum auto)", f"{text} {label}",
                                         "stall", "s", samples["upload"], samples[name], target=f"≤ {TARGET}×",
                                         op="<=", bound=TARGET))
        for subject_name, subject_text in (("upload_sync", f"upload(path) {label}, checksum sync"),
                                           ("upload_deferred", f"upload(path) {label}, checksum deferred")):
            result.rows.append(ratio_row(NAME, subject_text, f"shutil.copyfile {label}", "stall", "s",
                                         samples[subject_name], samples["copyfile"]))
        source.unlink()
    ctx.remove(settings.spool.parent)
    ctx.remove(work)
    return result
