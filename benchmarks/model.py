"""What a scenario reports: table rows (subject vs baseline, ratio, target, pass/miss) plus raw samples.

A row's verdict is computed here, from the numbers, in one place: no scenario decides its own pass/miss.
Two kinds of targets:
- a *ratio* target compares subject and baseline pair by pair (`ratio_row`): the verdict uses the median of
  the per-pair ratios, and the min–max of those ratios is shown next to it; a verdict whose bound lies
  inside that range is marked "within noise" (`Row.within_noise`);
- an *absolute* target bounds one statistic of the subject (`absolute_row`), e.g. p99 ≤ 5 ms.
Rows without a target are context (shown, never judged).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.stats import ratios, summary

_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Row:
    scenario: str
    subject: str
    baseline: str | None
    metric: str                 # what is measured, e.g. "stall", "throughput", "latency p99"
    unit: str                   # unit of subject/baseline values, e.g. "s", "MB/s", "ms", "MiB"
    stat: str                   # which statistic of the samples the row shows ("median", "p99", "max")
    subject_stats: dict[str, float]
    baseline_stats: dict[str, float] | None = None
    ratio_stats: dict[str, float] | None = None   # per-pair subject/baseline
    target: str | None = None   # human text, e.g. "≤ 1.1×"
    check: tuple[str, str, float] | None = None   # ("ratio" | "value", "<=" | ">=", bound)
    passed: bool | None = None
    note: str = ""
    shown: tuple[str, ...] = ("p50", "p99", "max")  # statistics displayed for a distribution (stat != median)

    def judge(self) -> Row:
        if self.check is None:
            self.passed = None
            return self
        what, op, bound = self.check
        value = (self.ratio_stats or {}).get("median") if what == "ratio" else self.subject_stats.get(self.stat)
        self.passed = None if value is None else bool(_OPS[op](value, bound))
        return self

    @property
    def within_noise(self) -> bool:
        """A ratio verdict the pairs do not settle: the bound lies inside the min–max of the per-pair ratios.
        For n pairs that range holds the true median ratio with probability 1 − 2·0.5ⁿ (94 % for 5 pairs,
        99.6 % for 9), so a verdict outside it is clear at that level and one inside it could flip."""
        if self.check is None or self.check[0] != "ratio" or not (self.ratio_stats or {}).get("n"):
            return False
        return self.ratio_stats["min"] <= self.check[2] <= self.ratio_stats["max"]


def ratio_row(scenario: str, subject: str, baseline: str, metric: str, unit: str, subject_samples: Sequence[float],
              baseline_samples: Sequence[float], *, target: str | None = None, op: str | None = None,
              bound: float | None = None, note: str = "") -> Row:
    """subject vs baseline, sample i paired with sample i (same round)."""
    check = ("ratio", op, bound) if op is not None and bound is not None else None
    return Row(scenario, subject, baseline, metric, unit, "median", summary(subject_samples),
               summary(baseline_samples), summary(ratios(subject_samples, baseline_samples)),
               target, check, note=note).judge()


def absolute_row(scenario: str, subject: str, metric: str, unit: str, samples: Sequence[float], *, stat: str,
                 target: str | None = None, op: str | None = None, bound: float | None = None,
                 baseline: str | None = None, baseline_samples: Sequence[float] | None = None,
                 note: str = "", shown: tuple[str, ...] = ("p50", "p99", "max")) -> Row:
    """One statistic of the subject against a fixed bound; a baseline, if given, is context only."""
    check = ("value", op, bound) if op is not None and bound is not None else None
    return Row(scenario, subject, baseline, metric, unit, stat, summary(samples),
               summary(baseline_samples) if baseline_samples is not None else None, None,
               target, check, note=note, shown=shown).judge()


@dataclass
class ScenarioResult:
    name: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)   # every raw sample, by series name
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        rows = [Row(**{**r, "check": tuple(r["check"]) if r.get("check") else None, "shown": tuple(r["shown"])})
                for r in data.get("rows", [])]
        return cls(**{**data, "rows": rows})
