"""Reloading the configuration of a running daemon (SIGHUP; `systemctl reload`).

Why: an operator caps the upload bandwidth while the training jobs need the network and lifts the cap at
night (a timer running `systemctl reload`), or turns on DEBUG logging to look at a live problem. A restart
would do too, but it interrupts the uploads in flight (they resume, re-sending their unfinished parts).

What: the configuration is read again the way the daemon read it at start (the same environment — fixed
for the life of a process, so a value to change this way belongs in the TOML file — and the same `--spool`).
The settings in `LIVE` take effect at once; any other setting that changed is named in the log as needing a
restart and keeps its running value, so `status` always shows what is in effect. A configuration that no
longer loads is refused whole, with the error, and the daemon runs on as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from mldash.config import FIELDS, Settings
from mldash.redact import redact_uri
from mldash.store.base import Store
from mldash_syncd.progress import human_bytes

log = logging.getLogger("mldash_syncd.reload")


def _apply_upload_rate(store: Store, rate: int | None) -> None:
    if store.rate_limit is None:  # a store that does not pace (none of ours): the change cannot apply
        raise RuntimeError(f"the store {store.url} does not pace its uploads")
    store.rate_limit.set_rate(rate)


def _apply_log_level(_store: Store, level: str) -> None:
    logging.getLogger().setLevel(level)


# The settings a running daemon takes up at once, each with how.
LIVE: dict[str, Callable[[Store, Any], None]] = {
    "max_upload_rate": _apply_upload_rate,
    "log_level": _apply_log_level,
}


_SIZES = {"spool_quota", "sync_checksum_limit", "max_file_size", "inline_max", "multipart_threshold", "part_size"}


def shown(name: str, value: Any) -> str:
    """A setting's value as a log line shows it (sizes and rates readable, URI passwords hidden)."""
    if name == "max_upload_rate":
        return f"{human_bytes(value)}/s" if value else "unlimited"
    if name in _SIZES and isinstance(value, int):
        return human_bytes(value)
    if isinstance(value, str):
        return repr(redact_uri(value))
    return repr(value)


@dataclasses.dataclass
class ReloadOutcome:
    settings: Settings  # the settings now in effect
    applied: list[str]  # "name old → new" for each live setting changed
    need_restart: list[str]  # the same for each changed setting kept at its running value


def reload_settings(running: Settings, reloaded: Settings, store: Store) -> ReloadOutcome:
    """Apply `reloaded`'s live settings to the daemon running with `running` and `store`."""
    applied: list[str] = []
    need_restart: list[str] = []
    in_effect: dict[str, Any] = {}
    for field in FIELDS:
        old, new = getattr(running, field.name), getattr(reloaded, field.name)
        if old == new:
            continue
        change = f"{field.name} {shown(field.name, old)} → {shown(field.name, new)}"
        if field.name not in LIVE:
            need_restart.append(change)
            continue
        try:
            LIVE[field.name](store, new)
        except Exception as exc:  # cannot apply here: it stays as it runs, like a restart-only setting
            need_restart.append(f"{change} ({exc})")
        else:
            in_effect[field.name] = new
            applied.append(change)
    # dataclasses.replace, not Settings.replace: the values are parsed and checked already.
    return ReloadOutcome(dataclasses.replace(running, **in_effect), applied, need_restart)


def log_outcome(outcome: ReloadOutcome) -> None:
    if not outcome.applied and not outcome.need_restart:
        log.info("configuration reloaded: nothing changed")
        return
    if outcome.applied:
        log.info("configuration reloaded: %s", "; ".join(outcome.applied))
    if outcome.need_restart:
        log.warning("configuration reloaded, but these take effect only after a restart (running on as before): %s",
                    "; ".join(outcome.need_restart))
