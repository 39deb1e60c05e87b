"""Entry point: `python -m benchmarks [--quick] [--only NAME ...] [--out DIR]`.

The parent process describes the machine, runs every scenario in a child process of its own (a fresh
interpreter: no memory, imports, threads or servers carried from one scenario into the next), collects each
child's JSON, then writes results.json, results.md and the plots. A full run of every scenario also
refreshes benchmarks/results/latest/ (the copy that is committed); quick or partial runs never touch it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import machine, report
from benchmarks.context import Context
from benchmarks.model import ScenarioResult

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# Run order: the cheap client-side scenarios first, moto-heavy ones last.
SCENARIOS = ("stall_torch", "stall_upload", "save_json_latency", "drain_large", "drain_small", "daemon_rss",
             "commit_latency", "resume_bytes", "upload_cap")


def _module(name: str) -> Any:
    return importlib.import_module(f"benchmarks.{name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (~1 min): a smoke run")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/<timestamp>)")
    parser.add_argument("--workdir", type=Path,
                        help="scratch directory for spools, stores and servers (default: a new dir under /tmp, "
                             "removed at the end)")
    parser.add_argument("--keep-workdir", action="store_true", help="do not remove the scratch directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="only rewrite results.md and the plots of DIR from its results.json (no measuring)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one scenario may take before it is killed (default 1800, quick 300)")
    # internal: one scenario in this process, result written as JSON
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(args: argparse.Namespace) -> int:
    """Run one scenario in this process and write its ScenarioResult as JSON (never raises)."""
    module = _module(args.child)
    ctx = Context(args.workdir, quick=args.quick)
    started = time.monotonic()
    try:
        result = module.run(ctx)
    except BaseException as exc:  # a broken scenario is reported in the table, the others still run
        traceback.print_exc()
        result = ScenarioResult(args.child, module.TITLE, error=f"{type(exc).__name__}: {exc}")
    finally:
        ctx.close()
    result.seconds = time.monotonic() - started
    args.result_file.write_text(json.dumps(result.to_json(), indent=1, default=str))
    return 0 if result.error is None else 1


def run_scenario(name: str, args: argparse.Namespace, workdir: Path) -> ScenarioResult:
    result_file = workdir / f"{name}.result.json"
    scenario_dir = workdir / name
    command = [sys.executable, "-m", "benchmarks", "--child", name, "--result-file", str(result_file),
               "--workdir", str(scenario_dir)]
    if args.quick:
        command.append("--quick")
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    started = time.monotonic()
    print(f"== {name}: {_module(name).TITLE}", file=sys.stderr, flush=True)
    try:
        subprocess.run(command, cwd=REPO, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ScenarioResult(name, _module(name).TITLE, error=f"timed out after {timeout:.0f}s",
                              seconds=time.monotonic() - started)
    finally:
        shutil.rmtree(scenario_dir, ignore_errors=True)  # spools, stores, server data: GBs
    if not result_file.exists():
        return ScenarioResult(name, _module(name).TITLE, error="the scenario process died without a result",
                              seconds=time.monotonic() - started)
    result = ScenarioResult.from_json(json.loads(result_file.read_text()))
    print(f"== {name}: {result.seconds:.1f}s{'  ERROR: ' + result.error if result.error else ''}",
          file=sys.stderr, flush=True)
    for row in result.rows:
        print("   " + report.row_text(row), file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if args.render:
        data = json.loads((args.render / "results.json").read_text())
        results = [ScenarioResult.from_json(r) for r in data["scenarios"]]
        report.write_all(args.render, data["run"], data["machine"], results, plots=not args.no_plots)
        print(f"rewrote {args.render / 'results.md'}", file=sys.stderr)
        return 0
    if args.list:
        for name in SCENARIOS:
            print(f"{name:20} {_module(name).TITLE}")
        return 0
    names = list(dict.fromkeys(args.only or SCENARIOS))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / (stamp + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    own_workdir = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mldash-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine.describe(workdir, REPO)
    started = time.monotonic()
    results: list[ScenarioResult] = []
    try:
        for name in names:
            results.append(run_scenario(name, args, workdir))
    finally:
        if own_workdir and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_at_end"] = list(os.getloadavg())
    run_info = {"started": stamp, "quick": args.quick, "scenarios": names,
                "seconds": round(time.monotonic() - started, 1), "command": " ".join(["python -m benchmarks",
                                                                                      *(argv or sys.argv[1:])])}
    report.write_all(out, run_info, info, results, plots=not args.no_plots)
    print(f"results: {out / 'results.md'}", file=sys.stderr)
    if not args.quick and not args.only and args.out is None:
        latest = RESULTS / "latest"
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(out, latest)
        print(f"copied to {latest}", file=sys.stderr)
    print(report.markdown_table(results))
    return 1 if any(r.error for r in results) else 0
