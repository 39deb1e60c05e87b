"""What needs someone's attention in a spool, for people and for monitoring (`mldash-syncd status --check`).

Why: a sync service fails quietly. Its job goes on saving, the spool holds everything, and nobody looks until
the disk is full or a checkpoint is missing when it is needed. `status` lists these problems; `status --check`
prints them on one line and exits 1, for a cron job, a job script's epilogue, or a monitoring agent
(Nagios-style plugins, node_exporter's textfile collector via `--json`).

A problem is something that does not fix itself: entries failed or quarantined (a person must look), pending
entries with no daemon to send them, a daemon that stopped writing its heartbeat (its loop is stuck) or never
wrote its first (stuck while starting), a store or catalog the daemon cannot reach, a daemon that sends to
another store or catalog than the configuration asking — or files committed to other targets that no `run --once`
configured like that has reported yet —, a spool close to its quota or its filesystem close to full, and — only when
asked for, since an offline node's backlog is normal — pending entries older than a limit.
"""

from __future__ import annotations

import re
import time
from typing import Any

from mldash.errors import MldashError
from mldash.targets import mismatch
from mldash_syncd.progress import human_bytes, human_duration

# The daemon writes its heartbeat every 2 s from its event loop (service.HEARTBEAT_INTERVAL). A minute without
# one is a loop stuck well past any single blocking step, yet long enough not to flag a busy machine.
STALE_HEARTBEAT_SECONDS = 60.0
# A start may take long before the first heartbeat: recovering a large spool, a store's first clean-up of crash
# debris (up to request_timeout), opening the store. Our units give a start TimeoutStartSec=10min.
STARTING_GRACE_SECONDS = 600.0
QUOTA_NEARLY_FULL = 0.9       # of the spool quota in use: saves are about to wait for space
FILESYSTEM_NEARLY_FULL = 2**30  # bytes free on the spool's filesystem: the next checkpoint may not fit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str, option: str | None = None) -> float:
    """'90', '90s', '30m', '2h', '1.5d' → seconds. `option`: named in the error."""
    match = _DURATION.match(value.lower())
    if not match:
        raise MldashError(f"{option + ' ' if option else ''}{value!r} is not a duration; use seconds or a number "
                          "with s, m, h or d (e.g. 900, 30m, 2h, 1d)")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def problems(data: dict[str, Any], *, max_pending_age: float | None = None,
             now: float | None = None) -> list[str]:
    """The problems in `status_data(...)` output, each one line saying what is wrong and what to do."""
    now = time.time() if now is None else now
    found: list[str] = []
    states, daemon = data["states"], data["daemon"]
    failed, quarantined = states["failed"]["count"], states["quarantined"]["count"]
    if failed or quarantined:
        found.append(f"{failed} failed and {quarantined} quarantined entries: see `mldash-syncd ls --state failed "
                     "--state quarantined`, then `retry` them once the cause is fixed")
    pending = f"{data['pendingFiles']} files ({human_bytes(data['pendingBytes'])}) pending"
    if data["pendingFiles"] and not daemon["running"]:
        holder = daemon.get("role")
        found.append(f"{pending} and no daemon running: `mldash-syncd run --once` syncs them"
                     + (f" (`mldash-syncd {holder}` holds the spool for now)" if holder else ""))
    own_beat = daemon["running"] and daemon.get("heartbeatPid") == daemon["pid"]
    if own_beat and (elsewhere := mismatch(data.get("askedTargets", data.get("targets")), daemon.get("targets"))):
        found.append(f"the running daemon (pid {daemon['pid']}) sends to {elsewhere}: it was started with "
                     "another configuration; restart it with this one")
    for apart in data.get("deliveredElsewhere") or []:
        found.append(f"{elsewhere_words(apart, now)}, not where this configuration sends (`mldash-syncd ls "
                     "--elsewhere` lists them). `mldash-syncd run --once` reports them (exit 1) and clears this; if "
                     "the configuration changed on purpose, that is all")
    if daemon["running"]:
        beat = daemon.get("heartbeat")
        touched = daemon.get("lockTouchedSecondsAgo")
        # A heartbeat of an earlier daemon (another pid) is no sign of this one: it may still be starting.
        if beat is not None and own_beat and now - beat > STALE_HEARTBEAT_SECONDS:
            found.append(f"the daemon (pid {daemon['pid']}) wrote no heartbeat for {human_duration(now - beat)}: "
                         "its loop is stuck; restart it (nothing spooled is lost)")
        elif not own_beat and touched is not None and touched > STARTING_GRACE_SECONDS:
            # It touched the lock as it took it, and writes its first heartbeat as its loop starts.
            found.append(f"the daemon (pid {daemon['pid']}) took the spool {human_duration(touched)} ago and has "
                         "written no heartbeat yet: it is stuck while starting (recovering the spool, opening its "
                         "index or the store); restart it (nothing spooled is lost)")
        for part in ("store", "catalog"):
            if reason := daemon.get(f"{part}Problem"):
                found.append(f"{part} unreachable: {reason}")
    age = data.get("oldestPendingAgeSeconds")
    if max_pending_age is not None and age is not None and age > max_pending_age:
        found.append(f"{pending}, the oldest for {human_duration(age)} (more than {human_duration(max_pending_age)})")
    if disk := data.get("disk"):
        quota, used = disk.get("quotaBytes"), disk.get("quotaUsedBytes")
        if quota and used is not None and used >= QUOTA_NEARLY_FULL * quota:
            found.append(f"spool quota {human_bytes(used)} of {human_bytes(quota)} in use: saves wait for space "
                         "once it is full")
        if disk["filesystemFreeBytes"] < FILESYSTEM_NEARLY_FULL:
            found.append(f"only {human_bytes(disk['filesystemFreeBytes'])} free on the spool's filesystem")
    return found


def elsewhere_words(apart: dict[str, Any], now: float | None = None) -> str:
    """'N files (B) were committed to X (configured here: Y), the last T ago, …: they are there' for one of
    status's `deliveredElsewhere` (mldash.targets.delivered_elsewhere)."""
    ago = human_duration((time.time() if now is None else now) - apart["lastCommitted"])
    return (f"{apart['files']} files ({human_bytes(apart['bytes'])}) were committed to {apart['where']}, the last "
            f"{ago} ago, not reported yet to a `run --once` configured like this: they are there")
