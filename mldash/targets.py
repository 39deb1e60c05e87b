"""Where a daemon sends a spool's entries — its store and its catalog — recorded in its heartbeat.

Why: a spool carries no configuration of its own; whoever drains it decides the destination. A job saving with
one configuration (say the default local store, because its environment lacked the S3 settings) autostarts a
daemon that commits there, and the job script's closing `mldash-syncd run --once`, configured for S3 and
MongoDB, would follow that daemon and exit 0 — "everything is synced" — with nothing in S3. So every daemon
writes its targets into its heartbeat; `run --once` refuses to vouch for a daemon that sends elsewhere, and
`status` shows the running daemon's targets when they differ from the configured ones. Each committed index row
records them too (`committed_to`, a `fingerprint`), so a client's `wait()`/`flush()` does not report as
committed what went to another store or catalog than its own settings name, and daemons that have exited can
still be held to account: `delivered_elsewhere` counts what was committed to other targets since a `run --once`
configured like the one asking last reported them (`record_reported`, in the index's meta) — the job's whole output,
when the job's environment lacked the settings its closing `run --once` has. Passwords never appear.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mldash.config import Settings
from mldash.redact import redact_uri

if TYPE_CHECKING:
    from mldash.spool.index import SpoolIndex


def sync_targets(settings: Settings) -> dict[str, str]:
    """The store and catalog these settings send to, as people read them (an S3 store with its endpoint, a
    MongoDB catalog with its hosts and database). Spellings of one target read the same: no URI options or
    credentials (they do not change where documents go), paths resolved (`//`, `..`, symlinks: `$HOME` is often
    one on clusters), an S3 prefix without empty segments, MongoDB hosts with their port, sorted."""
    parsed = urlparse(settings.store)
    if parsed.scheme == "file":
        store = "file://" + _real_path(unquote(parsed.path))
    elif parsed.scheme == "s3":
        prefix = "/".join(part for part in unquote(parsed.path).split("/") if part)
        store = f"s3://{parsed.netloc}" + (f"/{prefix}" if prefix else "")
        store += f" at {(settings.s3_endpoint_url or 'AWS').rstrip('/')}"
    else:
        store = settings.store.rstrip("/")
    parsed = urlparse(settings.catalog)
    if parsed.scheme.startswith("mongodb"):
        hosts = parsed.netloc.rpartition("@")[2].lower().split(",")
        if parsed.scheme == "mongodb":  # mongodb+srv names a DNS record, never a port
            hosts = [host if ":" in host.rpartition("]")[2] else f"{host}:27017" for host in hosts]
        catalog = f"{parsed.scheme}://{','.join(sorted(hosts))} (database {settings.mongo_database})"
    elif parsed.scheme == "sqlite":
        catalog = "sqlite://" + _real_path(unquote(parsed.path))
    else:
        catalog = redact_uri(settings.catalog)
    return {"store": store, "catalog": catalog}


def _real_path(path: str) -> str:
    # "//x" is a path POSIX lets mean something else; here it is a doubled slash (sqlite:////abs, file:////abs).
    return os.path.realpath("/" + path.lstrip("/"))


def asked_targets(settings: Settings) -> dict[str, str]:
    """The targets these settings name explicitly (`Settings.explicit`): what a client's `wait()`, `status` and
    `run --once` hold a daemon's deliveries against. A store or catalog left to its default asks nothing — a job
    under the per-researcher service, whose store settings sit in a file the job cannot read, sets only its spool
    and must not see every file as delivered elsewhere."""
    full = sync_targets(settings)
    return {what: full[what] for what in ("store", "catalog") if what in settings.explicit}


def mismatch(ours: dict[str, str] | None, theirs: dict[str, Any] | None) -> str | None:
    """How a daemon's recorded targets differ from `ours` (which may name only one of them), in words; None when
    they agree or either is not known (a heartbeat written before targets were recorded)."""
    if not ours or not theirs or "store" not in theirs or "catalog" not in theirs:
        return None
    differ = [f"{what} {theirs[what]} (configured here: {ours[what]})" for what in ("store", "catalog")
              if what in ours and theirs[what] != ours[what]]
    return " and ".join(differ) if differ else None


def committed_elsewhere(ours: dict[str, str] | None, committed_to: str | None) -> str | None:
    """How an index row's `committed_to` differs from `ours`, in words (`mismatch`); None when it does not or the
    row has no record."""
    return mismatch(ours, parse_fingerprint(committed_to))


def store_url(targets: dict[str, str]) -> str:
    """The store's URL in `sync_targets`' words (an S3 store's without the endpoint appended to it)."""
    return targets["store"].partition(" at ")[0]


def fingerprint(targets: dict[str, str]) -> str:
    """The targets (both, or the ones asked for) as one string, for an index row's `committed_to`."""
    return json.dumps({what: targets[what] for what in ("store", "catalog") if what in targets}, sort_keys=True)


def parse_fingerprint(text: str | None) -> dict[str, str] | None:
    """`fingerprint`'s targets back, or None (no record: a row committed before targets were recorded)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


REPORTED_META = "elsewhereReported"  # index meta: {fingerprint: when a `run --once` sending there last reported}


def record_reported(index: SpoolIndex, targets: dict[str, str], seen_at: float) -> None:
    """Note that `run --once` sending to `targets` reported, at `seen_at`, what had been committed elsewhere:
    from then on only later commits elsewhere are news. Only a run that showed them to someone records this —
    a service or an autostarted daemon that merely ran would clear the alarm unseen (it logs them, and goes on)."""
    reported = _reported(index)
    reported[fingerprint(targets)] = max(seen_at, reported.get(fingerprint(targets), 0.0))
    index.set_meta(REPORTED_META, json.dumps(reported, sort_keys=True))


def _reported(index: SpoolIndex) -> dict[str, float]:
    try:
        reported = json.loads(index.get_meta(REPORTED_META) or "{}")
    except ValueError:
        return {}
    if not isinstance(reported, dict):
        return {}
    return {k: v for k, v in reported.items() if isinstance(v, int | float)}


@dataclass(frozen=True)
class DeliveredElsewhere:
    """Files committed to other targets than the configured ones since a `run --once` configured like this last
    reported such files."""

    files: int
    bytes: int
    where: str  # `mismatch`'s words: their targets, and ours
    last_committed: float  # Unix time of the latest of them


def delivered_elsewhere(index: SpoolIndex, ours: dict[str, str]) -> list[DeliveredElsewhere]:
    """What was committed to targets other than `ours` since a `run --once` with `ours` last reported such files
    (`record_reported`), per other target. What it reported is history — seen, or a configuration changed on
    purpose — not news. Neither restarts of a daemon configured apart nor a daemon configured like this that
    merely ran (a service, the next job's autostart) hide anything."""
    if not ours:
        return []
    try:
        groups = index.committed_since(_reported(index).get(fingerprint(ours), 0.0))
    except sqlite3.Error:  # an index older than the `committed_to` column, opened read-only: nothing recorded
        return []
    # Merged by what differs: targets unlike each other may differ from `ours` alike (it may name only the store).
    found: dict[str, DeliveredElsewhere] = {}
    for committed_to, files, size, last in groups:
        if (where := committed_elsewhere(ours, committed_to)) is not None:
            seen = found.get(where)
            found[where] = DeliveredElsewhere(files, size, where, last) if seen is None else DeliveredElsewhere(
                seen.files + files, seen.bytes + size, where, max(seen.last_committed, last))
    return sorted(found.values(), key=lambda apart: apart.last_committed)
