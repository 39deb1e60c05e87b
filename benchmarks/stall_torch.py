"""Scenario 1 — the stall of `save_torch` against `torch.save` to a local file.

Subject: `exp.files("ckpt").save_torch(model, to="model.pt")` with the default settings — serialize into
the spool and return; no daemon runs. The default checksum mode, "auto", hashes artifacts up to 64 MiB on
the way and leaves larger ones to the daemon. Baseline: `torch.save(model.state_dict(), path)` to a file in
the same directory tree (same filesystem). Both include `state_dict()`, neither fsyncs (mldash's default
durability, "process", does not either). The model is an nn.Sequential of float32 Linear layers (≤ 64 MiB
each). After every sample the file/spool entry is deleted and dirty pages are flushed (`Context.settle`).
Context rows (not judged), interleaved in the same rounds against the same baseline samples: the same call
with MLDASH_CHECKSUM=sync (the call returns the SHA256 at every size) and =deferred (never hashes).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from benchmarks.context import GIB, MIB, Context, clear_spool
from benchmarks.model import ScenarioResult, ratio_row
from benchmarks.stats import interleave
from mldash.config import Settings

NAME = "stall_torch"
TITLE = "Stall of save_torch vs torch.save to a local file"
TARGET = 1.1


def build_model(nbytes: int):  # -> torch.nn.Module
    import torch

    width = 4096  # floats per row: 16 KiB
    rows = nbytes // (width * 4)
    layers = []
    while rows > 0:
        take = min(4096, rows)  # ≤ 64 MiB per tensor, like the big layers of a real model
        layers.append(torch.nn.Linear(width, take, bias=False))
        rows -= take
    return torch.nn.Sequential(*layers)


def run(ctx: Context) -> ScenarioResult:
    import torch

    from mldash import Experiment

    # 9 pairs at 1 GiB: a 1 GiB write on this VM takes ~0.37 s or ~0.8 s at random (for torch.save as much as for
    # save_torch; docs/benchmarks.md), so with 5 pairs the median ratio flipped between runs.
    sizes = [(4 * MIB, 3), (32 * MIB, 2)] if ctx.quick else [(10 * MIB, 7), (100 * MIB, 5), (GIB, 9)]
    result = ScenarioResult(NAME, TITLE, params={"sizes_bytes": [s for s, _ in sizes],
                                                 "pairs": {str(s): n for s, n in sizes},
                                                 "torch_version": torch.__version__})
    settings = ctx.settings("stall-torch")
    baseline_dir = ctx.fresh_dir("torch-save")
    modes = ("auto", "sync", "deferred")  # "auto" is the default; same spool, same filesystem for all
    handles = {mode: Experiment(prefix="bench/stall/torch", settings=settings.replace(checksum=mode)).files("ckpt")
               for mode in modes}

    for size, pairs in sizes:
        model = build_model(size)
        actual = sum(p.numel() * p.element_size() for p in model.parameters())
        label = _label(size)
        ctx.log(f"  state_dict of {label} ({actual} bytes of float32, {len(model)} tensors), {pairs} pairs")

        def subject(mode: str, model=model) -> Callable[[], float]:
            return lambda: timed_save(settings, mode, lambda: handles[mode].save_torch(model, to="model.pt"))

        def baseline(model=model) -> float:
            path = baseline_dir / "model.pt"
            started = time.perf_counter()
            torch.save(model.state_dict(), path)
            elapsed = time.perf_counter() - started
            path.unlink()
            return elapsed

        variants = {"save_torch": subject("auto"), "save_torch_sync": subject("sync"),
                    "save_torch_deferred": subject("deferred"), "torch.save": baseline}
        interleave(1, variants, between=ctx.settle)  # warm-up, dropped
        samples = interleave(pairs, variants, between=ctx.settle, log=ctx.log)
        for name, values in samples.items():
            result.samples[f"{label}/{name}_s"] = values
        result.rows.append(ratio_row(NAME, f"save_torch {label} (default: checksum auto)",
                                     f"torch.save {label} to a file", "stall", "s", samples["save_torch"],
                                     samples["torch.save"], target=f"≤ {TARGET}×", op="<=", bound=TARGET))
        for name, text in (("save_torch_sync", f"save_torch {label}, checksum sync"),
                           ("save_torch_deferred", f"save_torch {label}, checksum deferred")):
            result.rows.append(ratio_row(NAME, text, f"torch.save {label} to a file", "stall", "s",
                                         samples[name], samples["torch.save"]))
        del model
        gc.collect()
    ctx.remove(settings.spool.parent)
    ctx.remove(baseline_dir)
    return result


def timed_save(settings: Settings, mode: str, save: Callable[[], dict]) -> float:
    """One stall sample: the seconds `save()` (made with checksum `mode`) took. Checks that the mode under test
    is the one measured (a checksum exactly when the save hashes), then empties the spool."""
    started = time.perf_counter()
    saved = save()
    elapsed = time.perf_counter() - started
    limit = settings.replace(checksum=mode).hash_limit
    assert (saved["checksum"] is None) == (limit is not None and saved["sizeBytes"] > limit)
    clear_spool(settings)
    return elapsed


def _label(size: int) -> str:
    return f"{size // GIB} GiB" if size >= GIB and size % GIB == 0 else f"{size // MIB} MiB"
