"""Writing a run down: results.json (everything, machine-readable), results.md (the table), PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks import machine as machine_info
from benchmarks.model import Row, ScenarioResult


def _num(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _measured(label: str | None, stats: dict[str, float] | None, row: Row) -> str:
    if label is None:
        return "—"
    if not stats or not stats.get("n"):
        return label
    if row.stat != "median":  # a distribution: its shape in a few numbers
        shown = ", ".join(f"{name} {_num(stats.get(name))}" for name in row.shown)
        return f"{label}: {shown} {row.unit} n={stats['n']}"
    spread = f" ({_num(stats['min'])}–{_num(stats['max'])})" if stats["n"] > 1 else ""
    return f"{label}: median {_num(stats.get('median'), row.unit)}{spread} n={stats['n']}"


def verdict(row: Row) -> str:
    if row.passed is None:
        return "info" if row.check is None else "n/a"
    mark = "**pass**" if row.passed else "**MISS**"
    return f"{mark} (within noise)" if row.within_noise else mark


def row_cells(row: Row) -> list[str]:
    ratio = row.ratio_stats or {}
    median_ratio = f"{ratio['median']:.2f}×" if ratio.get("n") else "—"
    spread = f"{ratio['min']:.2f}–{ratio['max']:.2f}×" if ratio.get("n") else "—"
    return [row.scenario, _measured(row.subject, row.subject_stats, row),
            _measured(row.baseline, row.baseline_stats, row), median_ratio, spread,
            row.target or "—", verdict(row)]


def row_text(row: Row) -> str:
    cells = row_cells(row)
    return f"{cells[1]} | vs {cells[2]} | ratio {cells[3]} [{cells[4]}] | target {cells[5]} | {cells[6]}"


HEADER = ["scenario", "subject", "baseline", "median ratio", "ratio min–max", "target", "result"]


def markdown_table(results: list[ScenarioResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for result in results:
        if result.error:
            lines.append(f"| {result.name} | ERROR: {result.error} | | | | | **ERROR** |")
        for row in result.rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(row)) + " |")
    return "\n".join(lines)


def markdown(run: dict[str, Any], machine: dict[str, Any], results: list[ScenarioResult], plots: list[str]) -> str:
    parts = [f"# mldash benchmarks — {run['started']}{' (quick)' if run['quick'] else ''}", "",
             f"Machine: {machine_info.one_line(machine)}.",
             f"Load average at start {_loads(machine.get('load_average_at_start'))}, at end "
             f"{_loads(machine.get('load_average_at_end'))}. Git {machine.get('git', {}).get('commit', '?')[:12]}"
             f"{' (uncommitted changes)' if machine.get('git', {}).get('dirty') else ''}. "
             f"Total {run['seconds']:.0f} s. Command: `{run['command']}`.", "",
             "Ratios are subject/baseline per interleaved pair (for throughput: subject rate / baseline rate); "
             "the verdict uses the median of the per-pair ratios, or the stated statistic for absolute targets; "
             "\"within noise\": the target bound lies inside the min–max of the per-pair ratios, which for n "
             "pairs holds the true median ratio with probability 1 − 2·0.5ⁿ (94 % for 5 pairs), so the verdict "
             "could flip in another run. "
             "Methodology: docs/benchmarks.md.", "", markdown_table(results), ""]
    for result in results:
        if result.notes or result.params:
            parts.append(f"## {result.name} — {result.title}")
            parts.append("")
            if result.params:
                parts.append("Parameters: " + ", ".join(f"{k}={_param(v)}" for k, v in result.params.items()))
                parts.append("")
            for note in result.notes:
                parts.append(f"- {note}")
            for row in result.rows:
                if row.note:
                    versus = f" vs {row.baseline}" if row.baseline else ""
                    parts.append(f"- {row.subject}{versus}: {row.note}")
            parts.append("")
    if plots:
        parts.append("## Plots")
        parts.append("")
        parts += [f"![{name}]({name})" for name in plots]
        parts.append("")
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items() if v)
    parts += ["## Machine", "", f"- CPU: {machine.get('cpu_model')}, {machine.get('logical_cores')} logical / "
              f"{machine.get('physical_cores')} physical cores, flags {', '.join(machine.get('cpu_flags', []))}",
              f"- RAM: {machine.get('ram_gib')} GiB", f"- Disk: {json.dumps(machine.get('disk', {}))}",
              f"- OS: {machine.get('os')}; Python {machine.get('python')}", f"- Packages: {packages}", ""]
    return "\n".join(parts)


def _loads(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def write_all(out: Path, run: dict[str, Any], machine: dict[str, Any], results: list[ScenarioResult], *,
              plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_files: list[str] = []
    if plots:
        from benchmarks import plots as plotting

        plot_files = plotting.draw_all(out, results)
    data = {"run": run, "machine": machine, "scenarios": [r.to_json() for r in results], "plots": plot_files}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "results.md").write_text(markdown(run, machine, results, plot_files))
