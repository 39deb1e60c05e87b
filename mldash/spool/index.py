"""The spool index: a SQLite (WAL) table of every entry's state, lease, attempts and upload progress.

The daemon is its one writer (plus short CLI commands such as `retry`); training processes only ever
read it, so they never wait on its write lock. It holds no information that cannot be derived again:
`rebuild()` recreates it from the manifests, and every step after that is idempotent (an object
already in the store with the right checksum is not re-sent; catalog upserts are keyed by id).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mldash.spool.layout import FILE_MODE, SpoolLayout
from mldash.spool.manifest import Manifest
from mldash.spool.states import OUTSTANDING, TRANSITIONS, State, check_transition

SCHEMA_VERSION = 1
_MAX_EVENTS = 1000
_IDS_PER_STATEMENT = 500  # bound parameters per statement stay below SQLite's limit (999 in old builds)
# The states an entry may be in to move to each state (the state itself included: staying is allowed).
_SOURCES: dict[State, list[str]] = {
    target: [target.value, *(s.value for s, allowed in TRANSITIONS.items() if target in allowed)] for target in State}

_ENTRY_COLUMNS: dict[str, Any] = {
    "id": int, "state": str,
    "namespace": str, "project": str, "experiment": str, "prefix": str, "filename": str,
    "size": int, "sha256": str, "content_type": str, "created_at": float,
    "attempts": int,            # counted *before* each try, so a crash mid-try still counts
    "next_attempt_at": float,   # not before this Unix time (backoff)
    "last_error": str, "error_kind": str,
    "lease_owner": str, "lease_expires": float,
    "upload_id": str, "part_size": int, "store_key": str, "store_checksum": str,
    "bytes_sent": int,          # bytes put on the wire for this entry, over all attempts
    "uploaded_at": float, "committed_at": float, "evicted_at": float, "updated_at": float,
    "resaved_as": int,          # state resaved: the id the artifact went on under (states.py)
    "committed_to": str,        # the store and catalog the committing daemon sent it to (mldash/targets.py)
}


def _connect(path: Path, *, readonly: bool, power_safe: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, isolation_level=None,
                               check_same_thread=False)
    else:
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        os.chmod(path, FILE_MODE)
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if power_safe else 'NORMAL'}")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.row_factory = sqlite3.Row
    return conn


def entry_path(row: dict[str, Any]) -> str:
    """An index row's "namespace/project/experiment/prefix/filename", as people read where a file belongs."""
    return "/".join(str(row[k]) for k in ("namespace", "project", "experiment", "prefix", "filename") if row[k])


# The index columns a manifest fills (the rest is lifecycle state); each is the manifest attribute of that name.
_MANIFEST_COLUMNS = ("namespace", "project", "experiment", "prefix", "filename", "size", "sha256", "content_type",
                     "created_at")
_INSERT_FROM_MANIFEST = (f"INSERT OR IGNORE INTO entries (id, state, {', '.join(_MANIFEST_COLUMNS)}, updated_at) "
                         f"VALUES ({', '.join('?' * (len(_MANIFEST_COLUMNS) + 3))})")


def manifest_fields(manifest: Manifest) -> dict[str, Any]:
    """A manifest's index columns: the one mapping between the two."""
    return {name: getattr(manifest, name) for name in _MANIFEST_COLUMNS}


def _manifest_row(manifest: Manifest, state: State, now: float) -> tuple[Any, ...]:
    return (manifest.id, state.value, *(getattr(manifest, name) for name in _MANIFEST_COLUMNS), now)


def unindexed_row(file_id: int, manifest: Manifest | None, state: str) -> dict[str, Any]:
    """A row shaped like the index's for a save no daemon has indexed yet (`ls` lists them beside indexed ones),
    filled from its manifest; only the id when the manifest cannot be read."""
    row: dict[str, Any] = dict.fromkeys(_ENTRY_COLUMNS)
    row.update(id=file_id, state=state, attempts=0, bytes_sent=0)
    if manifest is not None:
        row.update(manifest_fields(manifest))
    return row


def read_heartbeat(layout: SpoolLayout) -> dict[str, Any]:
    """The last daemon's heartbeat (its pid, targets, gate errors…: mldash_syncd.service), or {} when there is none
    or it cannot be read — a reason to say nothing, never an error for the caller."""
    index = SpoolIndex.open_readonly(layout)
    if index is None:
        return {}
    try:
        beat = json.loads(index.get_meta("daemon") or "{}")
        return beat if isinstance(beat, dict) else {}
    except (sqlite3.Error, ValueError):
        return {}
    finally:
        index.close()


class SpoolIndex:
    """Read/write access to one spool's index. Not thread-safe: one per thread/event loop."""

    def __init__(self, layout: SpoolLayout, *, power_safe: bool = False, readonly: bool = False,
                 path: Path | None = None) -> None:
        self.layout = layout
        self.readonly = readonly
        self._snapshot_dir: str | None = None  # see open_snapshot
        self.conn = _connect(path or layout.index_path, readonly=readonly, power_safe=power_safe)
        # For the statements run once per multipart part (record_part, add_bytes_sent): `conn.execute` makes a
        # cursor per call, and the sqlite3 module keeps a weak reference to each one made — dead ones are only
        # dropped every 200 — so one reused cursor keeps those writes from growing memory with the part count.
        self._part_writes = self.conn.cursor()
        self._nesting = 0  # depth of `transaction()` blocks: inner ones join the outermost
        if not readonly:
            self._create_schema()
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(str(layout.index_path) + suffix, FILE_MODE)

    @classmethod
    def open_snapshot(cls, layout: SpoolLayout) -> SpoolIndex | None:
        """Like `open_readonly`, but leaving no file in the spool. A read-only SQLite connection to a WAL database
        creates its -wal and -shm files when no other connection has (the usual state once a daemon stopped
        cleanly) and leaves them. Without a -wal file the database file alone is the whole index, and nothing
        writes it until a writer's first checkpoint: a copy of it outside the spool, unchanged while copied,
        is a consistent snapshot. With a -wal file another process has the index open (or one was killed):
        its -wal and -shm are there already, and the index is read in place."""
        wal = str(layout.index_path) + "-wal"
        for _attempt in range(3):
            if os.path.exists(wal):
                break
            try:
                before = os.stat(layout.index_path)
            except FileNotFoundError:
                return None
            snapshot_dir = tempfile.mkdtemp(prefix="mldash-index-")
            copy = Path(snapshot_dir) / "index.sqlite"
            try:
                shutil.copyfile(layout.index_path, copy)
                after = os.stat(layout.index_path)
            except FileNotFoundError:  # a reindex removed it meanwhile
                shutil.rmtree(snapshot_dir, ignore_errors=True)
                continue
            if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size,
                                                                       after.st_mtime_ns):
                shutil.rmtree(snapshot_dir, ignore_errors=True)
                continue  # written while copied (a daemon's checkpoint, a reindex): again
            index = cls._complete_or_none(layout, copy)
            if index is None:
                shutil.rmtree(snapshot_dir, ignore_errors=True)
            else:
                index._snapshot_dir = snapshot_dir
            return index
        return cls.open_readonly(layout)

    @classmethod
    def open_readonly(cls, layout: SpoolLayout) -> SpoolIndex | None:
        """A read-only view, or None when no daemon has created the index yet."""
        if not layout.index_path.exists():
            return None
        return cls._complete_or_none(layout, layout.index_path)

    @classmethod
    def _complete_or_none(cls, layout: SpoolLayout, path: Path) -> SpoolIndex | None:
        try:
            index = cls(layout, readonly=True, path=path)
        except sqlite3.Error:
            return None
        try:
            # The schema row is written last (_create_schema): without it, a daemon is creating the index.
            complete = index.conn.execute("SELECT 1 FROM meta WHERE key = 'schema'").fetchone() is not None
        except sqlite3.Error:
            complete = False
        if not complete:
            index.close()
            return None
        return index

    def close(self) -> None:
        self.conn.close()
        if self._snapshot_dir is not None:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
            self._snapshot_dir = None

    def _create_schema(self) -> None:
        # Imported here: sqlite_utils pulls in numpy (~80 ms), and every training process imports this module
        # (through mldash.spool) without ever creating the index — only the daemon does.
        import sqlite_utils

        db = sqlite_utils.Database(self.conn)
        db["entries"].create(_ENTRY_COLUMNS, pk="id", not_null={"state"},
                             defaults={"attempts": 0, "next_attempt_at": 0.0, "bytes_sent": 0}, if_not_exists=True)
        db["parts"].create({"entry_id": int, "part_number": int, "size": int, "etag": str, "sha256": str},
                           pk=("entry_id", "part_number"), if_not_exists=True)
        db["events"].create({"seq": int, "ts": float, "entry_id": int, "level": str, "message": str},
                            pk="seq", if_not_exists=True)
        db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        # Columns added after an index was first created (an index outlives daemon versions: a spool waits on an
        # offline node for weeks): added in place, empty; readers use row.get() for them.
        present = {row[1] for row in self.conn.execute("PRAGMA table_info(entries)")}
        for name, kind in (("resaved_as", "INTEGER"), ("committed_to", "TEXT")):
            if name not in present:
                try:
                    self.conn.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # another writer added it a moment ago
                    if "duplicate column" not in str(exc):
                        raise
        db["entries"].create_index(["state", "next_attempt_at"], if_not_exists=True)
        db["entries"].create_index(["namespace", "project", "experiment"], if_not_exists=True)
        self._create_state_counts()
        # Last: a reader that finds this row finds every table and index above (open_readonly relies on it).
        self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def _create_state_counts(self) -> None:
        """Files and bytes per state, kept by triggers in the same transaction as every change of `entries`.
        Why: the daemon writes them into its heartbeat every 2 s and `run --once` reads them at every poll; a
        GROUP BY over the table took 216 ms at a million rows (a week of small files is that many evicted rows),
        on the event loop. An index created before this table gets it filled from the rows, in the transaction
        that creates it, so no change slips between the count and the triggers."""
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='trigger' AND name='entries_count_update'"
                             ).fetchone():
            return
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name='entries_count_update'").fetchone():
                return  # another writer made it a moment ago
            conn.execute("CREATE TABLE IF NOT EXISTS state_counts"
                         " (state TEXT PRIMARY KEY, count INTEGER NOT NULL, bytes INTEGER NOT NULL)")
            conn.execute("DELETE FROM state_counts")
            conn.execute("INSERT INTO state_counts SELECT state, COUNT(*), COALESCE(SUM(size),0) FROM entries"
                         " GROUP BY state")
            # Not an UPSERT: that needs SQLite 3.24, and a system Python may link an older one.
            add = ("INSERT OR IGNORE INTO state_counts(state, count, bytes) VALUES (NEW.state, 0, 0);"
                   " UPDATE state_counts SET count=count+1, bytes=bytes+COALESCE(NEW.size,0) WHERE state=NEW.state;")
            remove = ("UPDATE state_counts SET count=count-1, bytes=bytes-COALESCE(OLD.size,0)"
                      " WHERE state=OLD.state;")
            conn.execute(f"CREATE TRIGGER entries_count_insert AFTER INSERT ON entries BEGIN {add} END")
            conn.execute(f"CREATE TRIGGER entries_count_delete AFTER DELETE ON entries BEGIN {remove} END")
            conn.execute("CREATE TRIGGER entries_count_update AFTER UPDATE OF state, size ON entries"
                         f" WHEN OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size BEGIN {remove} {add} END")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Blocks nested in it join it: several steps (record an outcome, claim the
        next entry) commit together, or — if any of them raises — not at all."""
        if self._nesting:
            self._nesting += 1
            try:
                yield self.conn
            finally:
                self._nesting -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._nesting = 1
        try:
            yield self.conn
        except BaseException:
            self._nesting = 0
            self.conn.execute("ROLLBACK")
            raise
        self._nesting = 0
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:  # e.g. SQLITE_FULL at commit time: leave no transaction open
                self.conn.execute("ROLLBACK")
            raise

    # ---- ingest -------------------------------------------------------------------------------
    def known_ids(self) -> set[int]:
        return {row[0] for row in self.conn.execute("SELECT id FROM entries")}

    def ingest(self, manifests: Iterable[Manifest], now: float | None = None) -> int:
        """Add new manifests as queued; ids already present are left alone. Returns how many were new."""
        now = time.time() if now is None else now
        rows = [_manifest_row(m, State.QUEUED, now) for m in manifests]
        if not rows:
            return 0
        with self.transaction() as conn:
            # The statement's own rows: total_changes would count the state_counts triggers' writes as well.
            return conn.executemany(_INSERT_FROM_MANIFEST, rows).rowcount

    def ingest_broken(self, file_id: int, reason: str, manifest: Manifest | None = None,
                      now: float | None = None) -> None:
        """Record an entry that cannot be uploaded as it is: quarantined, with the reason. `manifest`: when it
        could be read (its blob is missing or wrong), so the row names the file (`ls` shows its path)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            if manifest is not None:
                conn.execute(_INSERT_FROM_MANIFEST, _manifest_row(manifest, State.QUARANTINED, now))
            conn.execute("INSERT OR IGNORE INTO entries (id, state, created_at, updated_at) VALUES (?,?,?,?)",
                         (file_id, State.QUARANTINED.value, now, now))
            conn.execute("UPDATE entries SET state=?, last_error=?, error_kind='corrupt', updated_at=?,"
                         " lease_owner=NULL, lease_expires=NULL WHERE id=? AND state NOT IN ('committed','evicted')",
                         (State.QUARANTINED.value, reason, now, file_id))
        self.add_event(file_id, "error", reason)

    # ---- reads --------------------------------------------------------------------------------
    def get(self, file_id: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM entries WHERE id=?", (file_id,)).fetchone()
        return dict(row) if row else None

    def states_of(self, ids: Iterable[int]) -> dict[int, State]:
        ids = list(ids)
        out: dict[int, State] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(f"SELECT id, state FROM entries WHERE id IN ({marks})", chunk):
                out[row[0]] = State(row[1])
        return out

    def rows(self, *, states: Iterable[State] | None = None, experiment: tuple[str, str, str] | None = None,
             ids: Iterable[int] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM entries WHERE 1=1", []
        if states is not None:
            states = list(states)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        if experiment is not None:
            sql += " AND namespace=? AND project=? AND experiment=?"
            args += list(experiment)
        if ids is not None:
            ids = list(ids)
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            args += ids
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [dict(r) for r in self.conn.execute(sql, args)]

    def evicted_before(self, cutoff: float) -> list[int]:
        """Ids of entries evicted before `cutoff` (Unix time; a row without the time counts as long ago)."""
        return [row[0] for row in self.conn.execute(
            "SELECT id FROM entries WHERE state='evicted' AND COALESCE(evicted_at, 0) < ?", (cutoff,))]

    def committed_since(self, since: float) -> list[tuple[str, int, int, float]]:
        """(committed_to, files, bytes, latest committed_at) per recorded targets, of the entries committed after
        `since`, evicted since or not."""
        return [tuple(row) for row in self.conn.execute(
            "SELECT committed_to, COUNT(*), COALESCE(SUM(size),0), MAX(committed_at) FROM entries"
            " WHERE committed_to IS NOT NULL AND committed_at>? AND state IN ('committed','evicted')"
            " GROUP BY committed_to ORDER BY MAX(committed_at)", (since,))]

    def evictable(self, keep: int, committed_by: float) -> list[int]:
        """Ids of the committed entries beyond the newest `keep` (by id) that were committed at or before
        `committed_by` (a row without the time counts as long ago). Selected in SQL: an eviction pass runs on the
        event loop after every batch of commits, and a long `evict_after` keeps many committed rows."""
        return [row[0] for row in self.conn.execute(
            "SELECT id FROM (SELECT id, committed_at FROM entries WHERE state='committed' ORDER BY id DESC"
            " LIMIT -1 OFFSET ?) WHERE COALESCE(committed_at, 0) <= ?", (keep, committed_by))]

    def counts(self) -> dict[str, dict[str, int]]:
        """Files and bytes per state (every state present, zeros included)."""
        out = {s.value: {"count": 0, "bytes": 0} for s in State}
        try:
            found = self.conn.execute("SELECT state, count, bytes FROM state_counts").fetchall()
        except sqlite3.OperationalError:  # an index no writer of this version has opened yet (read-only here)
            found = self.conn.execute("SELECT state, COUNT(*), COALESCE(SUM(size),0) FROM entries GROUP BY state"
                                      ).fetchall()
        for state, count, size in found:
            if count:
                out[state] = {"count": count, "bytes": size}
        return out

    def has_active(self) -> bool:
        """True while any entry still needs the daemon (queued, uploading or uploaded) — a cheap probe."""
        row = self.conn.execute("SELECT 1 FROM entries WHERE state IN ('queued','uploading','uploaded') LIMIT 1"
                                ).fetchone()
        return row is not None

    def oldest_outstanding_created_at(self) -> float | None:
        """When the oldest entry the daemon still has work on was saved (failed/quarantined ones excluded: `status`
        counts those apart, and an age next to "pending 0 files" would say something is waiting)."""
        marks = ",".join("?" * len(OUTSTANDING))
        row = self.conn.execute(f"SELECT MIN(created_at) FROM entries WHERE state IN ({marks})",
                                [s.value for s in OUTSTANDING]).fetchone()
        return row[0]

    def next_due(self, states: Iterable[State] = (State.QUEUED, State.UPLOADED)) -> float | None:
        """Earliest next_attempt_at among entries in `states` (default: all that wait for work)."""
        states = [s.value for s in states]
        if not states:
            return None
        marks = ",".join("?" * len(states))
        row = self.conn.execute(f"SELECT MIN(next_attempt_at) FROM entries WHERE state IN ({marks})", states).fetchone()
        return row[0]

    def cap_waits(self, latest: float) -> int:
        """Bring every wait for a next attempt forward to `latest` at most. Waits are capped by the backoff, so
        a later one means the wall clock stepped back since it was set (NTP, an admin): without this, the
        entry would sit out the whole step. Returns how many waits were shortened."""
        return self.conn.execute("UPDATE entries SET next_attempt_at=? WHERE state IN ('queued','uploaded')"
                                 " AND next_attempt_at > ?", (latest, latest)).rowcount

    def end_outage_waits(self, state: str, now: float | None = None) -> int:
        """Entries in `state` that wait only because of an outage (error_kind 'outage') may go now: the store or
        catalog answered again. Returns how many waits ended."""
        now = time.time() if now is None else now
        return self.conn.execute("UPDATE entries SET next_attempt_at=? WHERE state=? AND error_kind='outage'"
                                 " AND next_attempt_at > ?", (now, state, now)).rowcount

    # ---- leases and transitions ---------------------------------------------------------------
    def claim(self, owner: str, lease_seconds: float, limit: int, now: float | None = None,
              states: tuple[State, ...] = (State.QUEUED,)) -> list[dict[str, Any]]:
        """Lease up to `limit` due entries in `states` (oldest first) and mark queued ones uploading."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(states))
        with self.transaction() as conn:
            rows = [dict(r) for r in conn.execute(
                f"SELECT * FROM entries WHERE state IN ({marks}) AND next_attempt_at <= ? "
                f"AND (lease_expires IS NULL OR lease_expires < ?) ORDER BY next_attempt_at, id LIMIT ?",
                [*(s.value for s in states), now, now, limit])]
            # One UPDATE per target state (at most two), not one per row: claims run once per file.
            targets: dict[str, list[int]] = {}
            for row in rows:
                target = State.UPLOADING.value if row["state"] == State.QUEUED.value else row["state"]
                targets.setdefault(target, []).append(row["id"])
                row.update(state=target, lease_owner=owner, lease_expires=now + lease_seconds,
                           attempts=row["attempts"] + 1)
            for target, ids in targets.items():
                conn.execute(f"UPDATE entries SET state=?, lease_owner=?, lease_expires=?, attempts=attempts+1,"
                             f" updated_at=? WHERE id IN ({','.join('?' * len(ids))})",
                             (target, owner, now + lease_seconds, now, *ids))
        return rows

    def renew_lease(self, file_id: int, owner: str, lease_seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        cur = self.conn.execute("UPDATE entries SET lease_expires=? WHERE id=? AND lease_owner=?",
                                (now + lease_seconds, file_id, owner))
        return cur.rowcount == 1

    def release_expired_leases(self, now: float | None = None) -> int:
        """Leases whose owner died: uploading → queued (progress kept), others just unleased."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            changed = conn.execute("UPDATE entries SET state='queued', lease_owner=NULL, lease_expires=NULL,"
                                   " updated_at=? WHERE state='uploading' AND lease_expires < ?", (now, now)).rowcount
            conn.execute("UPDATE entries SET lease_owner=NULL, lease_expires=NULL WHERE state!='uploading'"
                         " AND lease_expires < ?", (now,))
        return changed

    def release_all_leases(self, owner: str) -> int:
        """At start-up of the one daemon holding the spool lock, no other lease can be live."""
        with self.transaction() as conn:
            changed = conn.execute("UPDATE entries SET state='queued', lease_owner=NULL, lease_expires=NULL"
                                   " WHERE state='uploading'").rowcount
            conn.execute("UPDATE entries SET lease_owner=NULL, lease_expires=NULL WHERE lease_owner IS NOT NULL")
        return changed

    def transition(self, file_id: int, target: State, *, release: bool = True, drop_parts: bool = False,
                   add: dict[str, int] | None = None, **fields: Any) -> None:
        """Move an entry to `target` (checked against the state machine) and set `fields`; `add` adds to
        counters (``add={"bytes_sent": n}``); `drop_parts` also forgets its recorded multipart progress, in
        the same transaction."""
        self.transition_many([file_id], target, release=release, drop_parts=drop_parts, add=add, **fields)

    def transition_many(self, file_ids: Iterable[int], target: State, *, release: bool = True,
                        drop_parts: bool = False, add: dict[str, int] | None = None, **fields: Any) -> None:
        """`transition` for many entries in one transaction: every one of them moves, or none does (an
        unknown id raises KeyError, a move the state machine forbids IllegalTransition; either aborts the
        whole transaction, an enclosing one included)."""
        ids = list(dict.fromkeys(file_ids))
        if not ids:
            return
        fields = {**fields, "state": target.value, "updated_at": time.time()}
        if release:
            fields.update(lease_owner=None, lease_expires=None)
        assignments = ", ".join([*(f"{name}=?" for name in fields), *(f"{name}={name}+?" for name in add or {})])
        values = [*fields.values(), *(add or {}).values()]
        sources = _SOURCES[target]
        source_marks = ",".join("?" * len(sources))
        with self.transaction() as conn:
            for start in range(0, len(ids), _IDS_PER_STATEMENT):
                chunk = ids[start:start + _IDS_PER_STATEMENT]
                marks = ",".join("?" * len(chunk))
                # The state machine is checked by the UPDATE itself (one statement per transition, no read
                # first); only a count short of the chunk reads the states back, to say which move failed.
                moved = conn.execute(f"UPDATE entries SET {assignments} WHERE id IN ({marks}) AND state IN "
                                     f"({source_marks})", [*values, *chunk, *sources]).rowcount
                if moved != len(chunk):
                    self._refuse(conn, chunk, target)
                if drop_parts:
                    conn.execute(f"DELETE FROM parts WHERE entry_id IN ({marks})", chunk)

    @staticmethod
    def _refuse(conn: sqlite3.Connection, chunk: list[int], target: State) -> None:
        """Raise for the first entry of `chunk` that cannot move to `target` (this raise rolls the UPDATE back
        with the transaction)."""
        marks = ",".join("?" * len(chunk))
        current = dict(conn.execute(f"SELECT id, state FROM entries WHERE id IN ({marks})", chunk).fetchall())
        for file_id in chunk:
            if file_id not in current:
                raise KeyError(file_id)
            if current[file_id] != target.value:  # the ones at `target` now moved (or stayed): not the culprit
                check_transition(file_id, State(current[file_id]), target)
        raise RuntimeError(f"transition to {target} of {len(chunk)} entries moved fewer rows than it matched")

    def update(self, file_id: int, **fields: Any) -> None:
        """Set bookkeeping fields without a state change (upload id, bytes sent…)."""
        assignments = ", ".join(f"{name}=?" for name in fields)
        self.conn.execute(f"UPDATE entries SET {assignments} WHERE id=?", [*fields.values(), file_id])

    def add_bytes_sent(self, file_id: int, count: int) -> None:
        self._part_writes.execute("UPDATE entries SET bytes_sent=bytes_sent+? WHERE id=?", (count, file_id))

    def retry(self, ids: Iterable[int] | None = None, now: float | None = None) -> list[int]:
        """Re-queue failed/quarantined entries, and make queued ones waiting out a backoff due now (all of them
        when `ids` is None), attempts reset: a person fixed the cause and wants them tried at once."""
        now = time.time() if now is None else now
        retryable = "(state IN ('failed','quarantined') OR (state='queued' AND next_attempt_at > ?))"
        with self.transaction() as conn:
            if ids is None:
                targets = [r[0] for r in conn.execute(f"SELECT id FROM entries WHERE {retryable}", (now,))]
            else:
                targets = [file_id for file_id in dict.fromkeys(ids)  # each id once, even if named twice
                           if conn.execute(f"SELECT 1 FROM entries WHERE id=? AND {retryable}", (file_id, now)
                                           ).fetchone()]
            for file_id in targets:
                before = conn.execute("SELECT state, last_error FROM entries WHERE id=?", (file_id,)).fetchone()
                conn.execute("UPDATE entries SET state='queued', attempts=0, next_attempt_at=0, error_kind=NULL,"
                             " lease_owner=NULL, lease_expires=NULL, updated_at=? WHERE id=?", (now, file_id))
                was = "waiting to retry" if before[0] == "queued" else before[0]
                self.add_event(file_id, "info", f"re-queued by retry (was {was}: {before[1]})")
        return targets

    def given_up(self, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """The failed/quarantined rows among `ids` (all of them when None): what `retry` re-queues and `discard`
        removes."""
        if ids is None:
            return [dict(r) for r in self.conn.execute(
                "SELECT * FROM entries WHERE state IN ('failed','quarantined') ORDER BY id")]
        rows = [self.get(file_id) for file_id in dict.fromkeys(ids)]
        return [row for row in rows if row is not None and row["state"] in ("failed", "quarantined")]

    def forget(self, rows: Iterable[dict[str, Any]], why: str) -> None:
        """Drop these entries from the index, each with an event saying `why` (their files must be gone first:
        a manifest left behind would be indexed again as a new save)."""
        with self.transaction() as conn:
            for row in rows:
                conn.execute("DELETE FROM parts WHERE entry_id=?", (row["id"],))
                conn.execute("DELETE FROM entries WHERE id=? AND state=?", (row["id"], row["state"]))
                self.add_event(row["id"], "info", f"{why} (was {row['state']}: {row['last_error']})")

    # ---- multipart progress -------------------------------------------------------------------
    def record_part(self, file_id: int, part_number: int, size: int, etag: str, sha256_b64: str) -> None:
        self._part_writes.execute("INSERT OR REPLACE INTO parts VALUES (?,?,?,?,?)",
                                  (file_id, part_number, size, etag, sha256_b64))

    def parts(self, file_id: int) -> dict[int, dict[str, Any]]:
        return {r["part_number"]: dict(r) for r in self.conn.execute(
            "SELECT * FROM parts WHERE entry_id=? ORDER BY part_number", (file_id,))}

    def part(self, file_id: int, part_number: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM parts WHERE entry_id=? AND part_number=?",
                                (file_id, part_number)).fetchone()
        return dict(row) if row else None

    def iter_parts(self, file_id: int) -> Iterator[tuple[int, int, str, str]]:
        """(part_number, size, etag, sha256) of each recorded part, in part order, read row by row: a caller
        completing an upload of 10,000 parts holds only what it builds from them."""
        for row in self.conn.execute("SELECT part_number, size, etag, sha256 FROM parts WHERE entry_id=?"
                                     " ORDER BY part_number", (file_id,)):
            yield row[0], row[1], row[2], row[3]

    def clear_parts(self, file_id: int) -> None:
        self.conn.execute("DELETE FROM parts WHERE entry_id=?", (file_id,))

    # ---- events and compaction ----------------------------------------------------------------
    def add_event(self, file_id: int | None, level: str, message: str) -> None:
        self.conn.execute("INSERT INTO events (ts, entry_id, level, message) VALUES (?,?,?,?)",
                          (time.time(), file_id, level, message))
        self.conn.execute("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (_MAX_EVENTS,))

    def recent_events(self, limit: int = 20, level: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events", []
        if level:
            sql, args = sql + " WHERE level=?", [level]
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit])]

    def events_for(self, file_id: int, limit: int = 50) -> list[dict[str, Any]]:
        """The latest `limit` events of one entry, oldest first."""
        rows = self.conn.execute("SELECT * FROM events WHERE entry_id=? ORDER BY seq DESC LIMIT ?", (file_id, limit))
        return [dict(r) for r in reversed(rows.fetchall())]

    def delete(self, ids: Iterable[int]) -> None:
        with self.transaction() as conn:
            for file_id in ids:
                conn.execute("DELETE FROM parts WHERE entry_id=?", (file_id,))
                conn.execute("DELETE FROM entries WHERE id=?", (file_id,))

    def history(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """What a rebuild from the manifests cannot recover: the rows of evicted entries (their manifests are
        gone; each says where its file went, `committed_to`) and the meta records other than the schema's and the
        last heartbeat."""
        rows = [dict(row) for row in self.conn.execute("SELECT * FROM entries WHERE state='evicted'")]
        meta = {key: value for key, value in self.conn.execute("SELECT key, value FROM meta")
                if key not in ("schema", "daemon")}
        return rows, meta

    def restore_history(self, rows: Iterable[dict[str, Any]], meta: dict[str, str]) -> None:
        """`history()` of an earlier index, into this one: rows whose id is taken here are left alone."""
        with self.transaction() as conn:
            for row in rows:
                known = {k: v for k, v in row.items() if k in _ENTRY_COLUMNS}
                conn.execute(f"INSERT OR IGNORE INTO entries ({', '.join(known)}) VALUES "
                             f"({', '.join('?' * len(known))})", list(known.values()))
            for key, value in meta.items():
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?,?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?,?)", (key, value))
