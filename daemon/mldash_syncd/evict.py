"""Eviction: removing the spooled bytes of committed entries (keep-last-N and age policy).

The manifest is removed before the blob: a crash in between leaves an orphan blob (debris that
start-up removes), never a manifest without bytes that a reindex would have to quarantine.
"""

from __future__ import annotations

import contextlib
import os
import time

from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.states import State

EVICTED_ROW_RETENTION = 7 * 24 * 3600.0  # `ls` history of evicted entries; the catalog keeps them forever


def evict(index: SpoolIndex, layout: SpoolLayout, *, keep: int, after: float, now: float | None = None) -> list[int]:
    now = time.time() if now is None else now
    evicted = evictable(index, keep=keep, after=after, now=now)
    remove_files(layout, evicted)
    record_evicted(index, evicted, now=now)
    return evicted


def evictable(index: SpoolIndex, *, keep: int, after: float, now: float) -> list[int]:
    """Committed entries beyond the newest `keep` that were committed at least `after` seconds ago."""
    return index.evictable(keep, now - after)


def remove_files(layout: SpoolLayout, ids: list[int]) -> None:
    """The spooled files of these entries, manifest first. Syscalls only: safe to run in a worker thread."""
    for file_id in ids:
        for path in (layout.manifest_path(file_id), layout.blob_path(file_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def record_evicted(index: SpoolIndex, ids: list[int], *, now: float) -> None:
    # One transaction for the pass. A crash before it leaves these rows committed with their files gone:
    # the next pass finds nothing to unlink and records them then.
    index.transition_many(ids, State.EVICTED, evicted_at=now)


def compact(index: SpoolIndex, *, now: float | None = None, retention: float = EVICTED_ROW_RETENTION,
            dry_run: bool = False) -> list[int]:
    """Drop index rows of entries evicted longer ago than `retention`; their ids (`dry_run`: only list them)."""
    now = time.time() if now is None else now
    # The ids only, selected in SQL: this runs on the event loop, and a busy spool keeps ~a week of evicted rows
    # (materialising every one as a dict took 3 s and 340 MiB at 200,000 of them).
    old = index.evicted_before(now - retention)
    if not dry_run:
        index.delete(old)
    return old
