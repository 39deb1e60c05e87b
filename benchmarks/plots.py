"""PNG plots of a run (matplotlib, Agg backend: no display needed). Each plot is drawn only when the
scenarios it needs were part of the run; a plot that fails is skipped, never the report."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.model import ScenarioResult


def draw_all(out: Path, results: list[ScenarioResult]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    by_name = {r.name: r for r in results if not r.error}
    drawn = []
    for filename, needs, draw in PLOTS:
        present = [by_name[n] for n in needs if n in by_name]
        if not present:
            continue
        try:
            draw(out / filename, present)
            drawn.append(filename)
        except Exception:  # a plot is a convenience: report it and go on
            print(f"plot {filename} failed:", file=sys.stderr)
            traceback.print_exc()
    return drawn


def _stats(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return median, median - ordered[0], ordered[-1] - median


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _series(result: ScenarioResult, suffix: str) -> dict[str, list[float]]:
    """label → samples for sample keys "<label>/<suffix>"."""
    return {key.rsplit("/", 1)[0]: values for key, values in result.samples.items() if key.endswith("/" + suffix)}


def _size_of(label: str) -> float:
    number, unit = label.split()
    return float(number) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def stall_plot(path: Path, results: list[ScenarioResult]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        names = sorted({key.rsplit("/", 1)[1] for key in result.samples if "/" in key})
        for name in names:
            series = _series(result, name)
            if not series:
                continue
            labels = sorted(series, key=_size_of)
            sizes = [_size_of(lbl) / 2**20 for lbl in labels]
            med, low, high = zip(*(_stats(series[lbl]) for lbl in labels), strict=True)
            ax.errorbar(sizes, med, yerr=[low, high], marker="o", capsize=4, label=name.removesuffix("_s"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel("stall (s): median, min–max")
        ax.set_title(result.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def drain_plot(path: Path, results: list[ScenarioResult]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        rates = {key.removesuffix("/rate"): values for key, values in result.samples.items()
                 if key.endswith("/rate")}
        unit = result.params.get("rate_unit", "")
        names = list(rates)
        med, low, high = zip(*(_stats(rates[n]) for n in names), strict=True) if names else ((), (), ())
        ax.bar(range(len(names)), med, yerr=[low, high], capsize=5,
               color=["tab:blue" if n.startswith("mldash") else "tab:gray" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel(f"{unit}: median, min–max")
        ax.set_title(result.title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)


def latency_plot(path: Path, results: list[ScenarioResult]) -> None:
    """Empirical CDFs of per-call latencies (log x): one panel per load pattern, colour = kind of call,
    line style = writer count."""
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[str, list[float]], list[float]]] = []
    for result in results:
        groups: dict[str, dict[str, list[float]]] = {}
        for key, values in result.samples.items():
            if not key.endswith("_ms") or not values:
                continue
            name = key.removesuffix("_ms")
            pattern, _, rest = name.partition(", ")
            if rest:
                groups.setdefault(f"{result.name}: {pattern} pattern", {})[rest] = values
            else:
                groups.setdefault(result.title, {})[name] = values
        bounds = result.params.get("latency_bounds_ms", [])
        panels += [(title, series, bounds) for title, series in groups.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    colours: dict[str, str] = {}
    for ax, (title, series, bounds) in zip(axes[0], panels, strict=True):
        for label, values in series.items():
            ordered = sorted(values)
            n = len(ordered)
            kind = label.split(", ")[-1]
            colour = colours.setdefault(kind, f"C{len(colours)}")
            style = "--" if label.startswith("1w") else "-"
            ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label, color=colour,
                    linestyle=style)
        for bound in bounds:
            ax.axvline(bound, color="red", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of calls ≤ x")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def rss_plot(path: Path, results: list[ScenarioResult]) -> None:
    import matplotlib.pyplot as plt

    result = results[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, trace in result.samples.items():
        if key.endswith("/trace") and trace:
            times, rss = zip(*[(t, r) for t, r in trace if r > 0], strict=True)  # 0: the process has exited
            ax.plot(times, rss, label=key.removesuffix("/trace"))
    budget = result.params.get("in_flight_budget_mib")
    idle = result.params.get("idle_peak_mib")
    if budget and idle:
        ax.axhline(idle + budget, color="red", linestyle="--", linewidth=1, label="idle peak + in-flight budget")
    _finish_time_plot(fig, ax, path, "RSS (MiB)", result.title, title_size=10)


def cap_plot(path: Path, results: list[ScenarioResult]) -> None:
    import matplotlib.pyplot as plt

    result = results[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, trace in result.samples.items():
        if not (key.endswith("/trace") and len(trace) > 2):
            continue
        cap = float(key.split()[1])
        # Wire rate over each WINDOW-long stretch of samples, and the cap it should keep to.
        times, counts = zip(*trace, strict=True)
        step = max(1, round(result.params.get("window_s", 0.25) / result.params.get("sample_interval_s", 0.02)))
        points = [((times[i] + times[i + step]) / 2, (counts[i + step] - counts[i]) / (times[i + step] - times[i])
                   / 2**20) for i in range(0, len(times) - step)]
        line, = ax.plot(*zip(*points, strict=True), label=f"{key.removesuffix('/trace')} (last sample)")
        ax.axhline(cap, color=line.get_color(), linestyle="--", linewidth=1)
    _finish_time_plot(fig, ax, path, "bytes up through the proxy (MiB/s, 250 ms windows)", result.title,
                      title_size=9)


def _finish_time_plot(fig: Any, ax: Any, path: Path, ylabel: str, title: str, *, title_size: int) -> None:
    """Labels, grid and legend of a plot over the time since the daemon started, then save it."""
    ax.set_xlabel("time since the daemon started (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


PLOTS: list[tuple[str, tuple[str, ...], Callable[[Path, list[ScenarioResult]], None]]] = [
    ("stall_vs_size.png", ("stall_torch", "stall_upload"), stall_plot),
    ("drain_throughput.png", ("drain_large", "drain_small"), drain_plot),
    ("latency_distributions.png", ("save_json_latency", "commit_latency"), latency_plot),
    ("daemon_rss.png", ("daemon_rss",), rss_plot),
    ("upload_cap.png", ("upload_cap",), cap_plot),
]
