"""Bringing the index in line with the manifests: ingest, debris clean-up, repair, rebuild.

Run by the daemon at start-up (and on every scan for `ingest_new`) and by `mldash-syncd reindex`.
Each problem is detected, reported as an index event, and either repaired or quarantined; none
raises out of here, so one bad file never blocks the rest of the queue.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mldash.errors import SpoolCorruptError
from mldash.ids import id_timestamp_ms
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.manifest import Manifest
from mldash.spool.states import PENDING, State
from mldash.spool.tmp_owner import Writer, writer_of

log = logging.getLogger("mldash.spool")

# A blob without a manifest is normal for the microseconds between the client's two links;
# only an old one is debris. ctime, not mtime: link() updates ctime, a slow write does not matter.
ORPHAN_BLOB_GRACE = 600.0
STALE_TMP_AGE = 24 * 3600.0


def read_manifest(layout: SpoolLayout, file_id: int) -> Manifest:
    path = layout.manifest_path(file_id)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpoolCorruptError(f"manifest {path.name}: cannot be read ({exc.strerror})") from None
    manifest = Manifest.decode(data, source=f"manifest {path.name}")
    if manifest.id != file_id:
        raise SpoolCorruptError(f"manifest {path.name}: holds id {manifest.id}, not {file_id}")
    return manifest


def open_spooled(layout: SpoolLayout, file_id: int) -> BinaryIO:
    """The spooled bytes of an entry as a binary file: its blob, or its inline payload.

    FileNotFoundError when neither is there (evicted). An open blob survives a later eviction."""
    try:
        return open(layout.blob_path(file_id), "rb", buffering=0)  # the caller closes it
    except FileNotFoundError:
        try:
            manifest = read_manifest(layout, file_id)
        except SpoolCorruptError:
            raise FileNotFoundError(f"no spooled bytes for {file_id}") from None
        if manifest.payload is None:
            raise
        return io.BytesIO(manifest.payload)


def manifest_ids(layout: SpoolLayout) -> set[int]:
    ids = set()
    with os.scandir(layout.manifests_dir) as entries:
        for entry in entries:
            file_id = SpoolLayout.manifest_id(entry.name)
            if file_id is not None:
                ids.add(file_id)
    return ids


@dataclass(frozen=True)
class Unindexed:
    """Saved entries no daemon has indexed yet: none has run since they were saved (an offline node, autostart
    off), or the running one has not got to them. They are pending like queued ones."""
    count: int
    bytes: int
    oldest_created_at: float | None  # Unix time (from the id), None when there are none


def unindexed(layout: SpoolLayout, known: set[int]) -> Unindexed:
    """Count the manifests not in `known` and their bytes: a stat of the blob, or for an inline entry (no
    blob) the size its manifest records. Unreadable ones count with 0 bytes: ingest will quarantine them."""
    ids = manifest_ids(layout) - known
    total = 0
    for file_id in ids:
        try:
            total += os.stat(layout.blob_path(file_id)).st_size
        except FileNotFoundError:
            with contextlib.suppress(SpoolCorruptError):
                total += read_manifest(layout, file_id).size
    oldest = id_timestamp_ms(min(ids)) / 1000 if ids else None
    return Unindexed(len(ids), total, oldest)


def unindexed_manifests(layout: SpoolLayout, known: set[int]) -> list[tuple[int, Manifest | None]]:
    """The saved entries not in `known`, oldest first, each with its manifest (None: it cannot be read — ingest
    will quarantine it). For listing them (`ls --state not-indexed`); one manifest read each."""
    found: list[tuple[int, Manifest | None]] = []
    for file_id in sorted(manifest_ids(layout) - known):
        try:
            found.append((file_id, read_manifest(layout, file_id)))
        except SpoolCorruptError:
            if layout.manifest_path(file_id).exists():  # else evicted since the listing: nothing to show
                found.append((file_id, None))
    return found


def ingest_new(index: SpoolIndex, layout: SpoolLayout, known: set[int],
               seen: Callable[[Manifest], None] | None = None, candidates: Iterable[int] | None = None) -> list[int]:
    """Index manifests not in `known` (updated in place); corrupt ones are quarantined with the reason.
    `seen` is handed every valid manifest read (the daemon keeps some, so it need not read them again).
    `candidates`: the ids to look at, oldest first (default: every manifest in the spool)."""
    fresh, good = [], []
    todo = sorted(manifest_ids(layout) - known) if candidates is None else [i for i in candidates if i not in known]
    for file_id in todo:
        manifest: Manifest | None = None  # read, but its blob is not usable: the row still says which file it is
        try:
            manifest = read_manifest(layout, file_id)
            if not manifest.inline:  # an inline manifest holds its bytes (its size was checked on decode)
                _check_blob(layout, manifest)
            good.append(manifest)
        except FileNotFoundError:
            index.ingest_broken(file_id, f"blob {file_id} is missing from blobs/ (its manifest is there): a copy of "
                                         "the spool made while a job was writing, or a deleted file; put the blob "
                                         f"back in blobs/ and `mldash-syncd retry {file_id}`", manifest)
            log.error("quarantined %s: blob missing", file_id)
        except OSError as exc:  # EACCES, ELOOP, EIO…: this entry is unusable, the others are not
            index.ingest_broken(file_id, f"blob {file_id} cannot be read ({exc.strerror})", manifest)
            log.error("quarantined %s: blob unreadable: %s", file_id, exc)
        except SpoolCorruptError as exc:
            index.ingest_broken(file_id, str(exc), manifest)
            log.error("quarantined %s: %s", file_id, exc)
        fresh.append(file_id)
    index.ingest(good)
    known.update(fresh)  # only once indexed: after a failed write (a full disk) the next scan tries them again
    if seen is not None:
        for manifest in good:
            seen(manifest)
    return fresh


def _check_blob(layout: SpoolLayout, manifest: Manifest) -> None:
    info = layout.blob_path(manifest.id).lstat()  # lstat: the daemon must never follow a link out of the spool
    if not stat.S_ISREG(info.st_mode):
        raise SpoolCorruptError(f"blob {manifest.id} is not a regular file")
    if info.st_size != manifest.size:
        raise SpoolCorruptError(f"blob {manifest.id}: {info.st_size} bytes, manifest says {manifest.size}")


def _is_inline(layout: SpoolLayout, file_id: int) -> bool:
    """Whether an entry's manifest holds its bytes (then it has no blob); False if it cannot be read."""
    try:
        return read_manifest(layout, file_id).inline
    except SpoolCorruptError:
        return False


@dataclass
class RecoveryReport:
    removed_tmp: list[str] = field(default_factory=list)
    removed_orphan_blobs: list[int] = field(default_factory=list)
    quarantined: list[int] = field(default_factory=list)
    released_leases: int = 0
    ingested: int = 0
    history_lost: str | None = None  # `rebuild`: why the old index's history could not be carried over
    history_kept: int = 0  # `rebuild`: evicted entries carried over from the old index


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_if_debris(entry: os.DirEntry, now: float, report: RecoveryReport, dry_run: bool = False) -> None:
    """A temp file is debris when its writer is gone: asked of the writer's lock (tmp_owner), and only where
    the lock cannot answer, of the pid in its name (meaningful in this PID namespace only) or its age."""
    writer, held = writer_of(entry.path) if entry.is_file(follow_symlinks=False) else (Writer.UNKNOWN, None)
    try:
        if writer is Writer.ALIVE:
            return
        pid = SpoolLayout.tmp_owner_pid(entry.name)
        # GONE: no writer of ours holds it; the pid still protects a writer of a version without the lock.
        if pid is None or not _pid_alive(pid) or now - entry.stat(follow_symlinks=False).st_ctime > STALE_TMP_AGE:
            if not dry_run:
                os.unlink(entry.path)  # under our lock: a writer that raced its creation sees it unlinked
            report.removed_tmp.append(entry.name)
    finally:
        if held is not None:
            os.close(held)


def clean_debris(layout: SpoolLayout, report: RecoveryReport, now: float | None = None,
                 orphan_grace: float = ORPHAN_BLOB_GRACE, keep: set[int] | frozenset[int] = frozenset(),
                 dry_run: bool = False) -> None:
    """Remove temp files of dead writers and blobs whose manifest never landed.

    `keep`: ids the index still holds as pending. Their blob is kept even when the manifest is gone,
    so the quarantined entry still has its bytes for the person who looks at it.
    `dry_run`: only report what would be removed.
    """
    now = time.time() if now is None else now
    for entry in _entries(layout.tmp_dir):
        with contextlib.suppress(FileNotFoundError):
            _remove_if_debris(entry, now, report, dry_run)
    manifests = manifest_ids(layout)
    for entry in _entries(layout.blobs_dir):
        file_id = SpoolLayout.blob_id(entry.name)
        if file_id is None or file_id in manifests or file_id in keep:
            continue  # not a name we wrote (left alone), or an entry that still needs its bytes
        with contextlib.suppress(FileNotFoundError):
            if now - entry.stat(follow_symlinks=False).st_ctime > orphan_grace:
                if not dry_run:
                    os.unlink(entry.path)
                report.removed_orphan_blobs.append(file_id)


def _entries(directory: Path) -> list[os.DirEntry]:
    """A spool directory's entries; none when it is missing — a copy made without tmp/ (as the offline guide's
    `rsync --exclude tmp/` makes it) has no debris there, and `gc --dry-run` must not create it."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def pending_ids(index: SpoolIndex) -> set[int]:
    """Ids whose bytes are still needed: pass as `keep` to `clean_debris`."""
    return {row["id"] for row in index.rows(states=PENDING)}


def reconcile(index: SpoolIndex, layout: SpoolLayout, report: RecoveryReport) -> None:
    """Pending index rows whose manifest or blob disappeared are quarantined, never silently dropped."""
    manifests = manifest_ids(layout)
    for row in index.rows(states=PENDING - {State.QUARANTINED}):
        file_id = row["id"]
        if file_id not in manifests:
            reason = "manifest disappeared from the spool"
        elif not layout.blob_path(file_id).exists() and not _is_inline(layout, file_id):
            reason = f"blob {file_id} disappeared from the spool"
        else:
            continue
        index.transition(file_id, State.QUARANTINED, last_error=reason, error_kind="corrupt")
        index.add_event(file_id, "error", reason)
        report.quarantined.append(file_id)


def recover(index: SpoolIndex, layout: SpoolLayout, owner: str, *, now: float | None = None,
            orphan_grace: float = ORPHAN_BLOB_GRACE, ingest: bool = True) -> RecoveryReport:
    """Start-up of the daemon that holds the spool lock: leases, debris, repair, and (`ingest`) ingest.

    `now` and `orphan_grace` exist for tests (an injected clock, a short grace).
    The daemon passes `ingest=False` and ingests in its loop, a chunk per pass, so that the first uploads of
    a large backlog do not wait until every manifest has been read."""
    report = RecoveryReport()
    report.released_leases = index.release_all_leases(owner)
    clean_debris(layout, report, now=now, orphan_grace=orphan_grace, keep=pending_ids(index))
    reconcile(index, layout, report)
    if ingest:
        report.ingested = len(ingest_new(index, layout, index.known_ids()))
    return report


def rebuild(layout: SpoolLayout, *, power_safe: bool = False) -> RecoveryReport:
    """`reindex`: throw the index away and rebuild it from the manifests (all pending → queued). Directories a
    copy left out (tmp/, or blobs/ of a spool of inline entries) are created again. What the manifests cannot
    tell — evicted entries, where each went, which configurations have looked at them — is carried over from the
    old index when it can still be read: a spool copied from an offline node whose daemon committed to another
    store (its local default) must still say so after the `reindex` of the offline guide."""
    layout.ensure()
    report = RecoveryReport()
    rows, meta, report.history_lost = _readable_history(layout)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(layout.index_path) + suffix)
    index = SpoolIndex(layout, power_safe=power_safe)
    try:
        clean_debris(layout, report)
        report.ingested = len(ingest_new(index, layout, set()))
        index.restore_history(rows, meta)
        report.history_kept = len(rows)
        return report
    finally:
        index.close()


def _readable_history(layout: SpoolLayout) -> tuple[list[dict], dict[str, str], str | None]:
    """The old index's `history()`, or nothing and why, when it is unreadable (often why one reindexes)."""
    if not layout.index_path.exists():
        return [], {}, None
    try:
        index = SpoolIndex.open_readonly(layout)
        if index is None:
            return [], {}, "the old index cannot be read (not a complete database)"
        try:
            return (*index.history(), None)
        finally:
            index.close()
    except sqlite3.Error as exc:
        return [], {}, f"the old index cannot be read: {exc}"
