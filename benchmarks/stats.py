"""Summary statistics and the interleaving of subject and baseline — no I/O here.

Why interleave: this machine is shared and noisy (page-cache writeback, other people's test runs). Running all
subject samples and then all baseline samples would let a slow minute land on one side only. Running them in
rounds, with the order rotated every round (A B, B A, A B …), spreads drift over both sides, and comparing
sample i of the subject with sample i of the baseline (a *pair*) cancels what both shared in that round.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, min, max, mean, p50/p95/p99 and n of a list of samples."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": float(statistics.median(values)), "min": float(min(values)),
            "max": float(max(values)), "mean": float(statistics.fmean(values)), "p50": percentile(values, 50),
            "p95": percentile(values, 95), "p99": percentile(values, 99)}


def ratios(subject: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """subject[i] / baseline[i], pair by pair."""
    return [s / b for s, b in zip(subject, baseline, strict=True) if b]


def interleave(rounds: int, variants: dict[str, Callable[[], Any]], *,
               between: Callable[[], None] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, list[Any]]:
    """Run every variant once per round, rotating the order each round; returns name → samples (round order).

    With two variants this is A B, B A, A B …; with three, A B C, B C A, C A B …. `between` runs after every
    single sample (cleanup, page-cache settling) so each sample starts from the same state.
    """
    names = list(variants)
    samples: dict[str, list[Any]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            value = variants[name]()
            samples[name].append(value)
            if log is not None:
                log(f"  round {number + 1}/{rounds} {name}: {_short(value)}")
            if between is not None:
                between()
    return samples


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items() if isinstance(v, (int, float)))
    return str(value)
