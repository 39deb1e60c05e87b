"""Garbage collection: debris, evicted rows, and multipart uploads of ours that nobody will finish.

An upload is only ever aborted when its key names an entry of *this* spool's index and that entry
no longer owns it (another upload id is recorded, or the entry is committed, evicted or
quarantined). Uploads under keys of unknown ids may belong to another spool writing into the same
bucket: they are left alone. Age is never used — it would abort live uploads after a clock jump.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mldash.keys import file_id_from_key, object_key
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.recovery import RecoveryReport, clean_debris, pending_ids
from mldash.spool.states import State
from mldash.store.base import PendingUpload, Store

log = logging.getLogger("mldash_syncd.gc")

_RESUMABLE = {State.QUEUED.value, State.UPLOADING.value, State.FAILED.value}


@dataclass
class GcReport:
    debris: RecoveryReport = field(default_factory=RecoveryReport)
    aborted: list[PendingUpload] = field(default_factory=list)
    kept: int = 0
    compacted: int = 0


def is_orphan(upload: PendingUpload, index: SpoolIndex, *, daemon_running: bool = False) -> bool:
    """`daemon_running`: a daemon holds the spool (only `gc --dry-run` looks then). An entry it is uploading may
    have started a multipart upload whose id it has not recorded yet: such uploads count as live."""
    file_id = file_id_from_key(upload.key)
    if file_id is None:
        return False
    row = index.get(file_id)
    if row is None or not _is_entry_key(upload.key, row):
        return False  # not an entry of this spool: the id alone may be another host's file's (ids.py)
    if daemon_running and row["state"] == State.UPLOADING.value:
        return False
    return not (row["state"] in _RESUMABLE and row["upload_id"] == upload.upload_id)


def _is_entry_key(key: str, row: dict) -> bool:
    """Whether `key` (with the store's root prefix) is the key of this index row's file, names and all."""
    if not row.get("filename"):
        return False  # a row without its names (an unreadable manifest): nothing to tell ours from another's
    own = object_key(namespace=row["namespace"], project=row["project"], experiment=row["experiment"],
                     prefix=row["prefix"] or "", file_id=row["id"], filename=row["filename"])
    return key == own or key.endswith("/" + own)


async def abort_orphan_uploads(store: Store, index: SpoolIndex, *, dry_run: bool = False,
                               daemon_running: bool = False) -> tuple[list, int]:
    aborted, kept = [], 0
    for upload in await store.list_multipart_uploads(store.key("files/")):
        if not is_orphan(upload, index, daemon_running=daemon_running):
            kept += 1
            continue
        if not dry_run:
            await store.abort_multipart(upload.key, upload.upload_id)
            log.info("gc: aborted orphaned multipart upload %s of %s", upload.upload_id, upload.key)
        aborted.append(upload)
    return aborted, kept


async def collect(store: Store, index: SpoolIndex | None, layout: SpoolLayout, *, dry_run: bool = False,
                  daemon_running: bool = False) -> GcReport:
    """`dry_run`: change nothing, report what would be removed, compacted and aborted. `daemon_running`: see
    `is_orphan` (a real collection needs the daemon lock, so only a dry run sees a running daemon). `index` None
    (a dry run on a spool no daemon has indexed yet): no entry is known, so no upload is ours to abort."""
    from mldash_syncd.evict import compact

    report = GcReport()
    # A quarantined entry keeps its bytes (pending_ids); a running daemon's writers are judged by their locks.
    clean_debris(layout, report.debris, keep=pending_ids(index) if index is not None else frozenset(),
                 dry_run=dry_run)
    if index is None:
        return report
    report.compacted = len(compact(index, dry_run=dry_run))
    report.aborted, report.kept = await abort_orphan_uploads(store, index, dry_run=dry_run,
                                                             daemon_running=daemon_running)
    return report
