"""The benchmark harness must not rot: `python -m benchmarks --quick` runs every scenario end to end.

No speed is asserted here (a shared 2-core machine cannot hold a speed test steady, and benchmarks/ is where
speed is judged); what is asserted is that every scenario ran, produced judged rows with samples, and that
the report (JSON, Markdown table, plots) was written. The pure pieces (percentiles, pairing, interleaving,
verdicts) are checked on known inputs, so a harness bug cannot flip a miss into a pass unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.model import ScenarioResult, absolute_row, ratio_row
from benchmarks.report import markdown_table
from benchmarks.run import SCENARIOS
from benchmarks.stats import interleave, percentile, ratios, summary

REPO = Path(__file__).resolve().parent.parent


def test_percentile_matches_linear_interpolation() -> None:
    values = [10.0, 1.0, 4.0, 3.0, 2.0]  # sorted: 1 2 3 4 10
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 90) == pytest.approx(4 + 0.6 * 6)
    assert summary([2.0, 4.0])["median"] == 3.0


def test_ratios_pair_sample_by_sample() -> None:
    assert ratios([2.0, 3.0, 8.0], [1.0, 3.0, 4.0]) == [2.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])


def test_interleave_rotates_the_order_every_round() -> None:
    calls: list[str] = []
    samples = interleave(3, {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0,
                             "c": lambda: calls.append("c") or 3.0})
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}


def test_verdicts_follow_the_numbers() -> None:
    slow = ratio_row("s", "subject", "base", "stall", "s", [1.2, 1.3, 1.25], [1.0, 1.0, 1.0], target="≤ 1.1×",
                     op="<=", bound=1.1)
    assert slow.passed is False and slow.ratio_stats["median"] == pytest.approx(1.25)
    fast = ratio_row("s", "subject", "base", "rate", "MB/s", [150.0, 140.0], [100.0, 100.0], target="≥ 1.0×",
                     op=">=", bound=1.0)
    assert fast.passed is True
    tail = absolute_row("s", "save_json", "latency", "ms", [1.0] * 98 + [9.0, 9.0], stat="p99", target="p99 ≤ 5 ms",
                        op="<=", bound=5.0)
    assert tail.passed is False
    context = absolute_row("s", "info only", "latency", "ms", [1.0], stat="p50")
    assert context.passed is None
    table = markdown_table([ScenarioResult("s", "t", rows=[slow, fast, tail, context])])
    assert table.count("**MISS**") == 2 and table.count("**pass**") == 1 and "| info |" in table
    assert "within noise" not in table  # every pair of slow and fast lies on one side of its bound


def test_a_verdict_the_pairs_do_not_settle_says_so() -> None:
    straddling = ratio_row("s", "subject", "base", "rate", "files/s", [90.0, 104.0, 97.0], [100.0] * 3,
                           target="≥ 1.0×", op=">=", bound=1.0)
    assert straddling.passed is False and straddling.within_noise
    assert "**MISS** (within noise)" in markdown_table([ScenarioResult("s", "t", rows=[straddling])])
    clear = ratio_row("s", "subject", "base", "rate", "files/s", [110.0, 104.0], [100.0] * 2, target="≥ 1.0×",
                      op=">=", bound=1.0)
    assert clear.passed is True and not clear.within_noise


@pytest.mark.timeout(400)
def test_quick_run_of_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--workdir",
                           str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-6000:]

    data = json.loads((out / "results.json").read_text())
    assert data["run"]["quick"] is True
    machine = data["machine"]
    for key in ("cpu_model", "logical_cores", "ram_gib", "disk", "python", "packages"):
        assert machine.get(key), key
    assert machine["packages"]["mldash"] and machine["packages"]["moto"]

    scenarios = {s["name"]: s for s in data["scenarios"]}
    assert list(scenarios) == list(SCENARIOS)
    for name, scenario in scenarios.items():
        assert scenario["error"] is None, (name, scenario["error"])
        assert scenario["rows"], name
        assert scenario["samples"], name
        judged = [r for r in scenario["rows"] if r["check"]]
        assert judged, f"{name} has no row with a target"
        for row in judged:
            assert row["passed"] in (True, False), (name, row)
            assert row["subject_stats"]["n"] >= 1

    table = (out / "results.md").read_text()
    assert "| scenario | subject | baseline | median ratio | ratio min–max | target | result |" in table
    assert "Machine:" in table
    for plot in data["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data["plots"]) == {"stall_vs_size.png", "drain_throughput.png", "latency_distributions.png",
                                  "daemon_rss.png", "upload_cap.png"}
    assert not list((tmp_path / "work").glob("*/spool*")), "scratch data left behind"


class _ProgramInsteadOfDaemon:
    """Stands in for the benchmark's Context in `daemon_rss.drain_and_sample`: runs this program as the daemon."""

    def __init__(self, code: str) -> None:
        self.code = code

    def daemon_command(self, *args: str) -> list[str]:
        return [sys.executable, "-c", self.code]


_SHARED_BUFFERS = """
import mmap, time
m = mmap.mmap(-1, 64 << 20)  # Python's default for anonymous memory: MAP_SHARED, counted as RssShmem
for i in range(0, 64 << 20, 4096):
    m[i] = 1
time.sleep(0.5)
"""

_TRANSIENT_PEAK = """
import time
time.sleep(0.3)
b = b"\\1" * (16 << 20)  # 16 MiB, gone again within a few ms: only the kernel's high-water mark keeps it
del b
time.sleep(0.3)
"""


@pytest.mark.parametrize(("program", "held_mib"), [(_SHARED_BUFFERS, 64), (_TRANSIENT_PEAK, 16)],
                         ids=["shared-anonymous-buffers", "peak-between-samples"])
def test_daemon_rss_judges_all_the_memory_a_daemon_holds(settings, program: str, held_mib: int) -> None:
    """The judged figure must see buffers mapped without MAP_PRIVATE (RssShmem, not RssAnon) and a peak that
    falls between two 20 ms samples: judging RssAnon alone, as one version did, saw 4.7 MiB of the 64."""
    from benchmarks.daemon_rss import drain_and_sample, judged_peak

    sample = drain_and_sample(_ProgramInsteadOfDaemon(program), settings)
    assert judged_peak(sample) >= held_mib, f"judged {judged_peak(sample):.1f} MiB of {held_mib} MiB held"
