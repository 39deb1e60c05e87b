"""`mldash-syncd`: run the daemon and inspect or repair a spool.

Every command takes the same configuration as the client (MLDASH_* variables, then the TOML file);
`--spool DIR` overrides the spool directory for one call.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shutil
import signal
import sqlite3
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import mldash
from mldash.catalog.base import CatalogError
from mldash.config import Settings
from mldash.errors import ConfigError, DaemonBusyError, MldashError
from mldash.spool.index import SpoolIndex, entry_path, read_heartbeat, unindexed_row
from mldash.spool.layout import SpoolLayout, directory_bytes
from mldash.spool.lock import DaemonLock, holder_pid, holder_role, is_held, seconds_since_touched
from mldash.spool.recovery import Unindexed, manifest_ids, rebuild, unindexed, unindexed_manifests
from mldash.spool.states import OUTSTANDING, State
from mldash.store.base import StoreError
from mldash.targets import (
    DeliveredElsewhere,
    asked_targets,
    committed_elsewhere,
    delivered_elsewhere,
    mismatch,
    parse_fingerprint,
    record_reported,
    sync_targets,
)
from mldash_syncd.evict import remove_files
from mldash_syncd.follow import NOT_INDEXED, Progress, follow, progress
from mldash_syncd.health import elsewhere_words, parse_duration, problems
from mldash_syncd.logfile import CappedLogFile
from mldash_syncd.logs import redact, setup_logging
from mldash_syncd.progress import ProgressBar, human_bytes, human_duration
from mldash_syncd.runner import exit_now_if_threads_are_stuck, run_loop
from mldash_syncd.show import entry_details, render

if TYPE_CHECKING:
    from mldash_syncd.service import RunReport

EXIT_OK, EXIT_LEFT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's status for a Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE (128 + 13), what `status | head` gives other tools


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "spool", None):
        overrides["spool"] = args.spool
    return Settings.load(check_catalog_uri=True, **overrides)


def _existing_spool(settings: Settings, why: str = "") -> SpoolLayout:
    """The spool the settings name; a directory that holds none (a typo, a copy that failed) is an error, never a
    spool to create: every command but the service (`run`) works on what is already there."""
    layout = SpoolLayout(settings.spool)
    if not layout.exists():
        raise MldashError(f"no spool at {settings.spool}{why} (check --spool / MLDASH_SPOOL; a spool holds SPOOL, "
                          "blobs/ and manifests/)")
    layout.check_marker()
    return layout


def _open_index(settings: Settings, *, write: bool = False) -> tuple[SpoolLayout, SpoolIndex | None]:
    layout = _existing_spool(settings)
    if write:
        return layout, SpoolIndex(layout.ensure(), power_safe=settings.power_safe)
    return layout, SpoolIndex.open_readonly(layout)


# ---- run ------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from mldash_syncd.service import Daemon

    settings = _settings(args)
    if args.max_wait is not None and not args.once:
        raise MldashError("--max-wait goes with --once (a service keeps retrying for as long as it runs)")
    if args.max_wait is not None:  # seconds, or a duration like --max-pending-age's (30m, 2h)
        args.max_wait = parse_duration(args.max_wait, option="--max-wait")
    if args.once and not args.autostarted:
        # A typo (or a copy that failed) must not become an empty spool reported as fully synced: the offline
        # guide frees a node's spool after exit 0. The service (`run`) still creates its spool.
        _existing_spool(settings, ": nothing to drain")
    capped = CappedLogFile.for_stderr(SpoolLayout(settings.spool).daemon_log_path) if args.autostarted else None
    setup_logging("WARNING" if args.quiet else settings.log_level, capped=capped)
    bar = None
    if args.once and not args.quiet:
        layout = SpoolLayout(settings.spool)
        index = SpoolIndex.open_readonly(layout) if layout.exists() else None
        if index is None:
            bar = ProgressBar(0, 0)
        else:
            try:
                # Indexed entries only: the daemon's "queued" event of each manifest it indexes adds the rest
                # (counting those here as well showed "2/4 files" at the end of a complete drain).
                now = progress(index, layout, count_unindexed=False)
            finally:
                index.close()
            bar = ProgressBar(now.pending_files, now.pending_bytes)
    deadline = None if args.max_wait is None else time.monotonic() + args.max_wait

    def drain_here() -> RunReport:
        daemon = Daemon(settings, autostarted=args.autostarted, on_event=bar.event if bar else None)

        async def main() -> RunReport:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, daemon.request_stop)
            if not args.once:  # the service: SIGHUP (`systemctl reload`) re-reads the configuration (reload.py)
                loop.add_signal_handler(signal.SIGHUP, daemon.reload, lambda: _settings(args))
            max_wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            return await daemon.run(until_drained=args.once, max_wait=max_wait)

        return run_loop(main())  # not asyncio.run: a stop must not wait for threads without a bound (runner.py)

    # What went elsewhere since a `run --once` configured like this one last reported it? Reported at the end.
    looked_at = time.time()
    before = _delivered_elsewhere(settings) if args.once else []
    followed_other = False
    while True:
        try:
            report = drain_here()
            break
        except DaemonBusyError as exc:
            if args.autostarted:
                return EXIT_OK  # another client started one first: fine
            if not args.once:
                print(f"mldash-syncd: {exc}", file=sys.stderr)
                return EXIT_BUSY
            if elsewhere := _holder_sends_elsewhere(settings):
                return _refuse_to_vouch(settings, str(exc), elsewhere)
            print(f"mldash-syncd: {exc}; following it until the spool is drained", file=sys.stderr)
            followed = _follow(settings, deadline, bar)
            if isinstance(followed, str):  # its heartbeat came late, naming other targets
                return _refuse_to_vouch(settings, str(exc), followed)
            if followed is not None:
                report, followed_other = followed, True
                break
            print("mldash-syncd: the other daemon exited; draining the rest here", file=sys.stderr)
    if bar:
        bar.finish()
    if args.once:
        left = ", ".join(f"{n} {s}" for s, n in sorted(report.remaining.items())) or "nothing"
        if followed_other:
            done = (f"the other daemon committed {report.committed} files" if report.committed or report.pending
                    else "nothing left to sync: the daemon holding the spool had committed everything")
        else:
            done = f"committed {report.committed} files ({human_bytes(report.bytes_sent)} sent)"
        print(f"{done}; in spool: {left}", file=sys.stderr)
        # Exit 0 would say "everything is synced" to a job script whose files went to another store.
        for apart in before:
            print(f"mldash-syncd: {elsewhere_words(_elsewhere_json(apart))}, not where this run sends "
                  "(`mldash-syncd ls --elsewhere` lists them). If the configuration changed on purpose, nothing "
                  "is wrong and the next run exits 0; otherwise they are only there: copy them over, or save them "
                  "again with this configuration.", file=sys.stderr)
        if before:
            _reported(settings, looked_at)
        if not report.clean:
            print("some entries are failed or quarantined: see `mldash-syncd ls --state failed --state "
                  "quarantined` for why, fix the cause, then `mldash-syncd retry --all`", file=sys.stderr)
            if report.remaining.get("quarantined"):
                print("(a quarantined entry's spooled bytes no longer match what was saved, its blob is missing — "
                      "a spool copied while a job wrote: copy the blob again — or its manifest is unreadable: a "
                      "retry helps only once they are restored; otherwise save the artifact again and give up on "
                      "the broken copy with `mldash-syncd discard ID`)", file=sys.stderr)
            return EXIT_LEFT_FAILED
        return EXIT_LEFT_FAILED if report.pending or before else EXIT_OK
    return EXIT_OK


def _delivered_elsewhere(settings: Settings) -> list[DeliveredElsewhere]:
    """What was committed elsewhere than these settings name since their `run --once` last reported it."""
    layout = SpoolLayout(settings.spool)
    index = SpoolIndex.open_readonly(layout) if layout.exists() else None
    if index is None:
        return []
    try:
        return delivered_elsewhere(index, asked_targets(settings))
    finally:
        index.close()


def _reported(settings: Settings, looked_at: float) -> None:
    """Record that this configuration's `run --once` has shown what was committed elsewhere up to `looked_at`
    (targets.record_reported): the next run reports only later ones. Beside a running daemon, like `retry`."""
    index = SpoolIndex(SpoolLayout(settings.spool), power_safe=settings.power_safe)
    try:
        record_reported(index, asked_targets(settings), looked_at)
    finally:
        index.close()


def _elsewhere_json(apart: DeliveredElsewhere) -> dict[str, Any]:
    return {"files": apart.files, "bytes": apart.bytes, "where": apart.where, "lastCommitted": apart.last_committed}


def _refuse_to_vouch(settings: Settings, busy: str, elsewhere: str) -> int:
    pid = holder_pid(SpoolLayout(settings.spool))
    print(f"mldash-syncd: {busy}, but it sends to {elsewhere}: its commits are not the ones this command was "
          "asked to check (the job that started it ran with another configuration). Stop it "
          f"(`kill {pid}`: nothing spooled is lost) and run this again; what it committed already is where it "
          "sent it.", file=sys.stderr)
    return EXIT_USAGE


HEARTBEAT_WAIT = 5.0  # seconds a follower waits for a just-started holder's first heartbeat (written at once)


def _holder_sends_elsewhere(settings: Settings, wait: float = HEARTBEAT_WAIT) -> str | None:
    """How the daemon holding the spool's targets differ from these settings' (targets.py); None when they agree
    or cannot be known yet (no heartbeat of it within `wait`: the follow asks again at every poll) or it is gone."""
    layout = SpoolLayout(settings.spool)
    give_up = time.monotonic() + wait
    while is_held(layout):
        beat = read_heartbeat(layout)
        if beat.get("pid") is not None and beat.get("pid") == holder_pid(layout):
            return mismatch(asked_targets(settings), beat.get("targets"))
        if time.monotonic() >= give_up:
            return None
        time.sleep(0.1)
    return None


def _follow(settings: Settings, deadline: float | None, bar: ProgressBar | None) -> RunReport | str | None:
    """Follow the daemon holding the spool (see follow.py): its outcome as a RunReport, None when it exited
    with work left, for this process to take over, or — its heartbeat naming other targets — how they differ."""
    from mldash_syncd.service import RunReport

    def shown(first: Progress, latest: Progress) -> None:
        if bar is not None:
            bar.show(files=latest.done_files - first.done_files, pending_files=latest.pending_files,
                     pending_bytes=latest.pending_bytes)

    followed = follow(SpoolLayout(settings.spool), deadline=deadline, on_progress=shown,
                      refuse_if=lambda: _holder_sends_elsewhere(settings, wait=0.0))
    if followed.outcome == "refused":
        return followed.reason
    if followed.outcome == "holder_gone" and (deadline is None or time.monotonic() < deadline):
        return None
    return RunReport(committed=followed.committed,
                     remaining=dict(followed.last.remaining) if followed.last else {})


# ---- status ---------------------------------------------------------------------------------------
def status_data(settings: Settings) -> dict[str, Any]:
    layout, index = _open_index(settings)
    data: dict[str, Any] = {
        "spool": str(settings.spool), "store": settings.store, "catalog": redact(settings.catalog),
        "targets": sync_targets(settings), "askedTargets": asked_targets(settings),
        "daemon": _holder(layout),
        "states": {s.value: {"count": 0, "bytes": 0} for s in State}, "pendingFiles": 0, "pendingBytes": 0,
        "oldestPendingAgeSeconds": None, "recentErrors": [], "throughputBytesPerSecond": 0.0,
    }
    if layout.exists():
        data["disk"] = disk_usage(settings, layout)
    if index is None:
        _add_unindexed(data, unindexed(layout, set()), None)
        return data
    try:
        data["states"] = index.counts()
        pending = [data["states"][s.value] for s in OUTSTANDING]
        data["pendingFiles"] = sum(p["count"] for p in pending)
        data["pendingBytes"] = sum(p["bytes"] for p in pending)
        _add_unindexed(data, unindexed(layout, index.known_ids()), index.oldest_outstanding_created_at())
        data["recentErrors"] = unresolved_errors(index)
        data["deliveredElsewhere"] = [_elsewhere_json(d) for d in delivered_elsewhere(index, data["askedTargets"])]
        beat = index.get_meta("daemon")
        if beat:
            info = json.loads(beat)
            data["daemon"].update(heartbeat=info.get("heartbeat"), heartbeatPid=info.get("pid"),
                                  targets=info.get("targets"),
                                  startedAt=info.get("startedAt"),
                                  autostarted=info.get("autostarted"), storeProblem=info.get("storeGate"),
                                  catalogProblem=info.get("catalogGate"), uploadRateCap=info.get("uploadRateCap"))
            if data["daemon"]["running"]:
                data["throughputBytesPerSecond"] = info.get("throughput", 0.0)
    finally:
        index.close()
    return data


def _holder(layout: SpoolLayout) -> dict[str, Any]:
    """Who holds the spool's lock: a daemon, or `gc`/`reindex` for a moment; and when a daemon last touched it
    (taking it, or at a heartbeat) — a daemon that never writes its first heartbeat is stuck while starting."""
    if not is_held(layout):
        return {"running": False, "pid": None}
    role = holder_role(layout)
    return {"running": role == "daemon", "pid": holder_pid(layout), "role": role,
            "lockTouchedSecondsAgo": seconds_since_touched(layout)}


def unresolved_errors(index: SpoolIndex, limit: int = 10) -> list[dict[str, Any]]:
    """The latest errors of entries not synced yet: an error its entry got past (a retry that committed it, a
    transient failure the next attempt cured) is history, not something to look at."""
    found = []
    for event in index.recent_events(10 * limit, level="error"):
        row = index.get(event["entry_id"]) if event["entry_id"] is not None else None
        if row is not None and row["state"] in (State.COMMITTED, State.EVICTED):
            continue
        if row is None and event["entry_id"] is not None:
            continue  # compacted away: evicted long ago
        found.append({"time": event["ts"], "id": str(event["entry_id"]), "message": event["message"]})
        if len(found) == limit:
            break
    return found


def _add_unindexed(data: dict[str, Any], saved: Unindexed, oldest_indexed: float | None) -> None:
    """Saves no daemon has indexed yet are pending too: without them, `status` on a node whose daemon never ran
    would say nothing is waiting while every checkpoint is."""
    data["notIndexed"] = {"count": saved.count, "bytes": saved.bytes}
    data["pendingFiles"] += saved.count
    data["pendingBytes"] += saved.bytes
    times = [t for t in (oldest_indexed, saved.oldest_created_at) if t is not None]
    data["oldestPendingAgeSeconds"] = max(0.0, time.time() - min(times)) if times else None


def disk_usage(settings: Settings, layout: SpoolLayout) -> dict[str, Any]:
    """What the spool takes on disk (artifacts in blobs/ and inline in manifests/), what its quota counts
    (blobs/), and what the filesystem has left — the numbers to look at before the disk fills."""
    blobs = directory_bytes(layout.blobs_dir)
    return {"spoolBytes": blobs + directory_bytes(layout.manifests_dir), "quotaBytes": settings.spool_quota,
            "quotaUsedBytes": blobs if settings.spool_quota is not None else None,
            "filesystemFreeBytes": shutil.disk_usage(layout.root).free}


def cmd_status(args: argparse.Namespace) -> int:
    max_age = parse_duration(args.max_pending_age) if args.max_pending_age is not None else None
    data = status_data(_settings(args))
    data["problems"] = problems(data, max_pending_age=max_age)
    failing = EXIT_LEFT_FAILED if args.check and data["problems"] else EXIT_OK
    if args.json:
        print(json.dumps(data, indent=2))
        return failing
    if args.check:  # one line, for a cron job, a job script or a monitoring agent
        if data["problems"]:
            print("mldash PROBLEM: " + "; ".join(data["problems"]))
        else:
            print(f"mldash OK: {data['pendingFiles']} files pending ({human_bytes(data['pendingBytes'])}), daemon "
                  + ("running" if data["daemon"]["running"] else "not running"))
        return failing
    daemon = data["daemon"]
    running = f"running (pid {daemon['pid']})" if daemon["running"] else "not running"
    if daemon.get("role", "daemon") != "daemon":  # `gc` or `reindex` holds the spool: no daemon meanwhile
        running += f": `mldash-syncd {daemon['role']}` (pid {daemon['pid']}) holds the spool"
    if daemon["running"] and daemon.get("heartbeat") and daemon.get("heartbeatPid") == daemon["pid"]:
        beat_age = human_duration(time.time() - daemon["heartbeat"])
        running = f"running (pid {daemon['pid']}; last heartbeat {beat_age} ago)"
    print(f"spool    {data['spool']}\nstore    {data['store']}\ncatalog  {data['catalog']}\ndaemon   {running}")
    for problem in ("storeProblem", "catalogProblem"):
        if daemon["running"] and daemon.get(problem):
            print(f"         {problem[:-7]} unavailable: {daemon[problem]}")
    print(f"\n{'state':<12}{'files':>8}{'bytes':>14}")
    saved = data["notIndexed"]
    for state, value in [("not indexed", saved), *data["states"].items()]:
        print(f"{state:<12}{value['count']:>8}{human_bytes(value['bytes']):>14}")
    age = data["oldestPendingAgeSeconds"]
    print(f"\npending  {data['pendingFiles']} files, {human_bytes(data['pendingBytes'])}"
          + (f"; oldest {human_duration(age)} old" if age is not None else ""))
    if data["pendingFiles"] and not daemon["running"]:
        print("         no daemon is running: `mldash-syncd run --once` syncs them and exits")
        if cut := data["states"]["uploading"]["count"] + data["states"]["uploaded"]["count"]:
            print(f"         ({cut} {'was' if cut == 1 else 'were'} cut short in upload or commit when the last daemon "
                  "ended: the next start "
                  "resumes them, re-sending only unfinished parts)")
    if daemon["running"]:
        cap = daemon.get("uploadRateCap")
        print(f"rate     {human_bytes(data['throughputBytesPerSecond'])}/s (last 30 s)"
              + (f"; capped at {human_bytes(cap)}/s (max_upload_rate)" if cap else ""))
    if disk := data.get("disk"):
        quota = ("no quota" if disk["quotaBytes"] is None else
                 f"quota {human_bytes(disk['quotaUsedBytes'])} of {human_bytes(disk['quotaBytes'])}")
        print(f"disk     {human_bytes(disk['spoolBytes'])} spooled ({quota}); "
              f"{human_bytes(disk['filesystemFreeBytes'])} free on its filesystem")
    if data["recentErrors"]:
        print("\nrecent errors:")
        for err in data["recentErrors"]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err["time"]))
            print(f"  {stamp}  {err['id']}  {err['message']}")
    if data["problems"]:
        print("\nproblems:")
        for problem in data["problems"]:
            print(f"  {problem}")
    return EXIT_OK


# ---- ls -------------------------------------------------------------------------------------------
NOT_INDEXED_CHOICE = "not-indexed"  # `ls --state`: saves no daemon has indexed yet (they have no index row)


def _unindexed_rows(layout: SpoolLayout, known: set[int],
                    experiment: tuple[str, str, str] | None) -> list[dict[str, Any]]:
    """Saves not indexed yet, as index-shaped rows read from their manifests (unreadable ones under any filter:
    ingest will quarantine them)."""
    return [unindexed_row(file_id, manifest, NOT_INDEXED) for file_id, manifest in unindexed_manifests(layout, known)
            if manifest is None or experiment is None
            or (manifest.namespace, manifest.project, manifest.experiment) == experiment]


def cmd_ls(args: argparse.Namespace) -> int:
    settings = _settings(args)
    layout, index = _open_index(settings)
    chosen = set(args.state or ())
    experiment = tuple(args.experiment.strip("/").split("/")) if args.experiment else None
    if experiment is not None and len(experiment) != 3:
        raise MldashError(f"--experiment {args.experiment!r}: expected namespace/project/experiment")
    rows: list[dict[str, Any]] = []
    known: set[int] = set()
    if index is not None:
        try:
            states = [State(s) for s in chosen - {NOT_INDEXED_CHOICE}] if chosen else None
            if states is None or states:
                rows = index.rows(states=states, experiment=experiment, limit=None if args.elsewhere else args.limit)
            known = index.known_ids()
        finally:
            index.close()
    listed_unindexed = NOT_INDEXED_CHOICE in chosen
    if listed_unindexed:
        rows = sorted(rows + _unindexed_rows(layout, known, experiment), key=lambda r: r["id"])[:args.limit]
    if args.elsewhere:  # committed to other targets than this configuration names (targets.py)
        ours = asked_targets(settings)
        rows = [r for r in rows if committed_elsewhere(ours, r.get("committed_to")) is not None][:args.limit]
    if args.json:
        print(json.dumps([{**r, "id": str(r["id"]), "committed_to": parse_fingerprint(r.get("committed_to"))}
                          for r in rows], indent=2))
        return EXIT_OK
    print(f"{'id':<20} {'state':<12}{'size':>11}  {'att':>3}  path / error")
    for r in rows:
        line = f"{r['id']:<20} {r['state']:<12}{human_bytes(r['size'] or 0):>11}  {r['attempts']:>3}  "
        line += entry_path(r) if r["filename"] else "(unreadable manifest)"
        if r["state"] == "resaved":
            line += f"\n{'':<20}   ↳ re-saved as {r.get('resaved_as')}: {r['last_error']}"
        elif r["last_error"] and r["state"] in ("failed", "quarantined", "queued", "uploaded"):
            line += f"\n{'':<20}   ↳ {r['last_error']}"
        print(line)
    if not listed_unindexed and (saved := len(manifest_ids(layout) - known)):  # a count: no manifest read each
        print(f"({saved} saved entries are not indexed yet, so not listed: a daemon indexes them when it runs; "
              f"`--state {NOT_INDEXED_CHOICE}` lists them)", file=sys.stderr)
    return EXIT_OK


# ---- show ---------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        file_id = int(args.id)
    except ValueError:
        raise MldashError(f"{args.id!r}: an entry id is a decimal number (see `mldash-syncd ls`)") from None
    layout, index = _open_index(settings)
    try:
        details = entry_details(layout, index, file_id, settings.store, asked_targets(settings))
    finally:
        if index is not None:
            index.close()
    print(json.dumps(details, indent=2) if args.json else render(details))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from mldash_syncd.check import FAIL, check, render

    settings = _settings(args)
    findings = run_loop(check(settings))  # not asyncio.run: a hung local store must not hold the exit
    if args.json:
        print(json.dumps({**sync_targets(settings), "findings": [f.as_json() for f in findings]}, indent=2))
    else:
        print(render(settings, findings))
    return EXIT_LEFT_FAILED if any(f.verdict == FAIL for f in findings) else EXIT_OK


# ---- retry / reindex / gc -------------------------------------------------------------------------
def _named_ids(args: argparse.Namespace, verb: str) -> list[int] | None:
    """The ids `retry`/`discard` name; None for --all (every failed and quarantined entry; for `retry`, and every
    one waiting to retry)."""
    if not args.all and not args.ids:
        every = "every failed and quarantined entry" + (", and every one waiting to retry" if verb == "retry" else "")
        raise MldashError(f"name the ids to {verb}, or pass --all ({every})")
    try:
        return None if args.all else [int(i) for i in args.ids]
    except ValueError:
        raise MldashError(f"ids must be decimal numbers, got {args.ids}") from None


def _left_alone(index: SpoolIndex, ids: list[int] | None, taken: set[int]) -> tuple[list[int], dict[int, str]]:
    """Of the ids named, those not in the index, and the states of those that were not failed or quarantined."""
    left = sorted(set(ids) - taken) if ids is not None else []
    states = {i: row["state"] for i in left if (row := index.get(i)) is not None}
    return [i for i in left if i not in states], states


def cmd_retry(args: argparse.Namespace) -> int:
    ids = _named_ids(args, "retry")
    layout, index = _open_index(_settings(args), write=True)
    try:
        done = index.retry(ids)
        unknown, states = _left_alone(index, ids, set(done))
    finally:
        index.close()
    if done:
        layout.wake_daemon()  # a running daemon starts them now
    if unknown:
        print(f"no such entry in this spool's index: {' '.join(map(str, unknown))} (`mldash-syncd ls` lists them; "
              "a save not indexed yet is picked up by the next daemon run)", file=sys.stderr)
    if states:
        shown = " ".join(f"{i} ({state})" for i, state in states.items())
        print(f"not failed, quarantined or waiting to retry (left alone): {shown}", file=sys.stderr)
    print(f"re-queued {len(done)} entries")
    return EXIT_USAGE if unknown else EXIT_OK


def cmd_discard(args: argparse.Namespace) -> int:
    """Give up on failed or quarantined entries for good: their spooled files and index rows go. What is left is
    what `run --once` still has to deliver — an artifact whose spooled bytes were corrupted would otherwise make
    every later `run --once` exit 1."""
    ids = _named_ids(args, "discard")
    layout, index = _open_index(_settings(args), write=True)
    try:
        rows = index.given_up(ids)
        unknown, states = _left_alone(index, ids, {row["id"] for row in rows})
        remove_files(layout, [row["id"] for row in rows])  # manifest first, then the blob (see SpoolIndex.forget)
        index.forget(rows, "discarded with `mldash-syncd discard`")
    finally:
        index.close()
    for row in rows:
        print(f"discarded {row['id']} ({entry_path(row) or 'unreadable manifest'}; {row['state']}: "
              f"{row['last_error']})")
    if unknown:
        print(f"no such entry in this spool's index: {' '.join(map(str, unknown))}", file=sys.stderr)
    if states:
        shown = " ".join(f"{i} ({state})" for i, state in states.items())
        print(f"not failed or quarantined (left alone — only those can be discarded): {shown}", file=sys.stderr)
    print(f"discarded {len(rows)} entries")
    return EXIT_USAGE if unknown or states else EXIT_OK


def cmd_reindex(args: argparse.Namespace) -> int:
    settings = _settings(args)
    layout = _existing_spool(settings)
    with DaemonLock(layout, role="reindex"):  # never rebuild under a running daemon
        report = rebuild(layout, power_safe=settings.power_safe)
    print(f"reindexed {settings.spool}: {report.ingested} entries, {len(report.removed_tmp)} temp files and "
          f"{len(report.removed_orphan_blobs)} orphan blobs removed"
          + (f"; the history of {report.history_kept} evicted entries kept" if report.history_kept else ""))
    if report.history_lost:
        print(f"note: {report.history_lost}; the history of evicted entries (where each went) is not carried over",
              file=sys.stderr)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging("WARNING")
    layout = _existing_spool(settings)
    if args.dry_run:
        return _gc_dry_run(settings, layout)
    with DaemonLock(layout, role="gc"):  # never collect under a running daemon: it alone knows its uploads in progress
        index = SpoolIndex(layout.ensure(), power_safe=settings.power_safe)
        try:
            report = _collect(settings, index, layout, dry_run=False, daemon_running=False)
        finally:
            index.close()
    print(f"gc: aborted {len(report.aborted)} orphaned multipart uploads ({report.kept} live kept); removed "
          f"{len(report.debris.removed_tmp)} temp files, {len(report.debris.removed_orphan_blobs)} orphan blobs; "
          f"compacted {report.compacted} evicted rows")
    return EXIT_OK


def _gc_dry_run(settings: Settings, layout: SpoolLayout) -> int:
    """Only looks: takes no lock and opens the index read-only, so it may run beside a daemon (whose uploads in
    progress then count as live) or beside a `reindex`, and never creates or changes a file in the spool."""
    daemon_running = is_held(layout)
    index = SpoolIndex.open_snapshot(layout)
    try:
        report = _collect(settings, index, layout, dry_run=True, daemon_running=daemon_running)
    finally:
        if index is not None:
            index.close()
    print(f"gc: would abort {len(report.aborted)} orphaned multipart uploads ({report.kept} live kept); would "
          f"remove {len(report.debris.removed_tmp)} temp files, {len(report.debris.removed_orphan_blobs)} orphan "
          f"blobs; would compact {report.compacted} evicted rows")
    for upload in report.aborted:
        print(f"  {upload.key}  (upload {upload.upload_id})")
    if index is None:
        why = "the process holding this spool has not created it" if daemon_running else "no daemon has run on it"
        print(f"  (no index yet: {why}, so no upload in the store is known to be ours)")
    if daemon_running:
        print("  (another process holds this spool — a daemon, or a reindex: its work in progress counts as live; "
              "the daemon runs gc at start-up, or stop it and run `mldash-syncd gc`)")
    return EXIT_OK


def _collect(settings: Settings, index: SpoolIndex | None, layout: SpoolLayout, *, dry_run: bool,
             daemon_running: bool) -> Any:
    from mldash.store import make_store
    from mldash_syncd.gc import collect

    async def run() -> Any:
        async with make_store(settings, read_only=dry_run) as store:
            return await collect(store, index, layout, dry_run=dry_run, daemon_running=daemon_running)
    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mldash-syncd",
        description="Drain an mldash spool to the store (S3 or a directory) and the catalog (MongoDB or SQLite). "
                    "Configuration: MLDASH_* environment variables, then $MLDASH_CONFIG or "
                    "~/.config/mldash/config.toml.")
    spool_help = "spool directory (default: MLDASH_SPOOL or the configured one)"
    parser.add_argument("--spool", help=spool_help)
    parser.add_argument("--version", action="version", version=f"mldash-syncd {mldash.__version__}")
    # `--spool` after the command as well (`mldash-syncd status --spool DIR`): SUPPRESS keeps one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spool", default=argparse.SUPPRESS, help=spool_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    run = command("run", help="run the daemon (as a service, or --once to drain and exit)",
                  description="Watch the spool and sync every entry: upload, verify SHA256, commit. Stops "
                              "gracefully on SIGTERM/SIGINT, checkpointing in-flight multipart uploads.")
    run.add_argument("--once", action="store_true",
                     help="drain what is spooled, then exit: 0 if everything committed, 1 if anything is left "
                          "failed/quarantined (or pending at --max-wait), or files were committed to another "
                          "store or catalog than this configuration names (reported once), 2 if the daemon "
                          "holding the spool sends elsewhere. If another daemon holds the spool, follow it until "
                          "the spool is drained (take over if it exits first)")
    run.add_argument("--max-wait", default=None, metavar="DURATION",
                     help="with --once: give up after this long (seconds, or 30m, 2h…; e.g. while the store is "
                          "unreachable); exit 1 if anything is left pending")
    run.add_argument("--quiet", action="store_true", help="no progress bar; warnings and errors only")
    run.add_argument("--autostarted", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    status = command("status", help="counts per state, pending bytes, oldest entry, errors, rate",
                     description="Summarise the spool: entries per state, bytes pending, age of the oldest "
                                 "pending entry, recent errors, the running daemon's throughput, and "
                                 "the problems that need attention (--check: those only, exit 1 if any).")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--check", action="store_true",
                        help="health check: one line, exit 1 if anything needs attention (failed or quarantined "
                             "entries, pending entries and no daemon, a stuck daemon, store or catalog "
                             "unreachable or not answering, a daemon sending to another store or catalog or files "
                             "committed there, spool quota or filesystem nearly full)")
    status.add_argument("--max-pending-age", metavar="DURATION", default=None,
                        help="also a problem: an entry pending longer than this (e.g. 30m, 2h, 1d)")
    status.set_defaults(func=cmd_status)

    ls = command("ls", help="list spool entries", description="List spool entries, oldest first.")
    ls.add_argument("--state", action="append", choices=[*(s.value for s in State), NOT_INDEXED_CHOICE],
                    help=f"only entries in this state (repeatable); {NOT_INDEXED_CHOICE}: saves no daemon has "
                         "indexed yet (e.g. an offline node's)")
    ls.add_argument("--experiment", metavar="NS/PROJECT/EXP", help="only this experiment")
    ls.add_argument("--limit", type=int, default=None, help="at most this many rows")
    ls.add_argument("--elsewhere", action="store_true",
                    help="only entries committed to another store or catalog than this configuration names "
                         "(`show ID` says where)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    show = command("show", help="everything known of one entry: state, times, upload progress, errors",
                   description="Show one entry: where it goes, when it was saved, uploaded, committed and evicted, "
                               "its multipart progress, bytes sent, tags, and its errors and retries. Read-only.")
    show.add_argument("id", help="the entry id (from `ls`, an error message, or a save's result['id'])")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)

    check = command("check", help="try the store and catalog for what the daemon relies on",
                    description="Write, read and remove a few small probe objects under mldash-check/ in the store "
                                "(conditional creates, SHA256 checksums, multipart, a wrong checksum refused, "
                                "deletes) and open and read the catalog (nothing is written there). Exit 1 if "
                                "something the daemon relies on does not hold; warnings say what to set.")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_check)

    for name, func, summary, description in (
            ("retry", cmd_retry, "re-queue failed or quarantined entries; try waiting ones now",
             "Re-queue failed/quarantined entries, and end the backoff of queued ones waiting to retry after a "
             "transient error (attempts reset): once you fixed the cause. A running daemon starts them at once."),
            ("discard", cmd_discard, "give up on failed or quarantined entries: remove them from the spool",
             "Remove failed/quarantined entries from the spool for good (their spooled files and index rows), e.g. "
             "an artifact whose spooled bytes were corrupted and that was saved again. Works while a daemon runs.")):
        on_given_up = command(name, help=summary, description=description)
        on_given_up.add_argument("ids", nargs="*", help="entry ids (see `ls --state failed --state quarantined`)")
        on_given_up.add_argument("--all", action="store_true", help="every failed and quarantined entry"
                                 + (", and every one waiting to retry" if name == "retry" else ""))
        on_given_up.set_defaults(func=func)

    reindex = command("reindex", help="rebuild the index from the manifests (e.g. after copying a spool)",
                      description="Throw the index away and rebuild it from the manifests: every entry not "
                                  "yet evicted is queued again (already-uploaded ones are verified, not "
                                  "re-sent). Refuses to run while a daemon holds the spool.")
    reindex.set_defaults(func=cmd_reindex)

    gc = command("gc", help="abort our orphaned multipart uploads, remove debris",
                 description="Abort multipart uploads that belong to entries of this spool but that no "
                             "entry will finish; remove temp files of dead writers and orphan blobs; "
                             "compact old evicted rows. Refuses to run while a daemon holds the spool "
                             "(the daemon runs gc itself at start-up); --dry-run may.")
    gc.add_argument("--dry-run", action="store_true",
                    help="only report what would be aborted, removed and compacted; changes nothing and takes no "
                         "lock, so it also runs beside a daemon")
    gc.set_defaults(func=cmd_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _run_command(args)
    except Exception:
        # A bug of ours, or an error nobody foresaw: its traceback, and exit 1 (systemd restarts the service) —
        # without first waiting for a thread blocked in a hung mount, which Python would do at exit for ever.
        exit_now_if_threads_are_stuck(EXIT_LEFT_FAILED, before=traceback.print_exc)
        raise
    # Also after an error: a store call past its deadline leaves its thread blocked (a hung mount), and Python
    # would wait for it at exit, for ever.
    exit_now_if_threads_are_stuck(code)
    return code


def _index_unreadable(exc: sqlite3.DatabaseError) -> bool:
    """SQLite's words for an index file that is not (or no longer) a database, as opposed to a busy or full one."""
    return any(words in str(exc) for words in ("file is not a database", "database disk image is malformed"))


def _run_command(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except DaemonBusyError as exc:
        print(f"mldash-syncd {args.command}: {exc}; stop it first (on SIGTERM it checkpoints and exits)",
              file=sys.stderr)
        return EXIT_BUSY
    except (StoreError, CatalogError) as exc:
        if not exc.transient:
            print(f"mldash-syncd: {exc}", file=sys.stderr)
            return EXIT_USAGE
        # Not a configuration problem: exit 1, which systemd's Restart=on-failure retries (2 would stop it).
        what = "store" if isinstance(exc, StoreError) else "catalog"
        print(f"mldash-syncd {args.command}: the {what} is not available: {exc}; nothing spooled is lost — run "
              "again once it is", file=sys.stderr)
        return EXIT_LEFT_FAILED
    except sqlite3.DatabaseError as exc:
        if not _index_unreadable(exc):
            raise
        # Restarting into the same broken file would fail every 10 s for ever: exit 2, saying what helps.
        print(f"mldash-syncd {args.command}: the spool's index cannot be read ({exc}); `mldash-syncd reindex` "
              "rebuilds it from the manifests (nothing spooled is lost)", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, MldashError) as exc:
        print(f"mldash-syncd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `mldash-syncd status | head`: the reader is gone; end quietly like other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # A spool this user cannot write (read-only mount, another user's spool): a configuration problem,
        # exit 2 — which also tells systemd not to restart into the same error.
        print(f"mldash-syncd {args.command}: cannot write {exc.filename or 'the spool'}: {exc.strerror}; "
              "status and ls work read-only, the other commands need a writable spool", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C outside the daemon's own loop (which turns SIGINT into a graceful stop): while following
        # another daemon, or before the loop started. Nothing here holds the spool, so there is nothing to undo.
        print("\nmldash-syncd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
