"""`SqliteCatalog`: the embedded default catalog, one SQLite file (WAL) with nothing to set up.

Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`):

* ``files`` — one row per file version, a column per `FileDocument` field; ``tags`` and ``metadata``
  are JSON text (the document as given, order kept); ``id`` is the primary key, so
  ``INSERT OR IGNORE`` makes `upsert` first-writer-wins: a replay changes nothing. `upsert_many`
  writes a batch in one transaction and reports the ids whose insert was ignored.
* ``file_tags(file_id, tag)`` — the tag lookup, written in the same transaction as the row, so an
  all-of tag filter is one ``EXISTS`` per tag in SQL instead of loading the experiment.

All SQLite calls run on one dedicated thread that owns the connection: the event loop never blocks
on the file lock, and calls are serialised without a lock of our own. Each call has a deadline
(`request_timeout`); at the deadline the statement is interrupted and `TransientCatalogError`
raised. Several processes may open the same file (the daemon writes, `ls` reads): WAL plus a busy
timeout shorter than the deadline handles that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mldash.catalog.base import (
    Catalog,
    CatalogError,
    FileDocument,
    FileQuery,
    PermanentCatalogError,
    TransientCatalogError,
)
from mldash.catalog.query import Glob, folder
from mldash.errors import TRANSIENT_OS_ERRNOS
from mldash.spool.layout import make_private_dir, open_private

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_OPEN_BUSY_STEP = 0.05  # seconds SQLite's busy handler waits at a time while the catalog opens
_IDS_PER_SELECT = 500  # below SQLite's limit on bound parameters in one statement (999 in old builds)

_COLUMNS = ("id", "namespace", "project", "experiment", "path", "filename", "sizeBytes", "checksum",
            "contentType", "storageKey", "storageUri", "createdAt", "committedAt", "description",
            "tags", "metadata")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id          TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    project     TEXT NOT NULL,
    experiment  TEXT NOT NULL,
    path        TEXT NOT NULL,
    filename    TEXT NOT NULL,
    sizeBytes   INTEGER NOT NULL,
    checksum    TEXT NOT NULL,
    contentType TEXT NOT NULL,
    storageKey  TEXT NOT NULL,
    storageUri  TEXT NOT NULL,
    createdAt   REAL NOT NULL,
    committedAt REAL NOT NULL,
    description TEXT,
    tags        TEXT NOT NULL,   -- JSON array, as given
    metadata    TEXT NOT NULL    -- JSON object, as given
);
CREATE INDEX IF NOT EXISTS files_by_folder ON files (namespace, project, experiment, path, createdAt, id);
CREATE INDEX IF NOT EXISTS files_by_time ON files (namespace, project, experiment, createdAt, id);
CREATE TABLE IF NOT EXISTS file_tags (
    file_id TEXT NOT NULL REFERENCES files (id),
    tag     TEXT NOT NULL,
    PRIMARY KEY (file_id, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS file_tags_by_tag ON file_tags (tag, file_id);
"""

# Primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF) after which retrying can succeed:
# another process holds the lock, an I/O hiccup, a full disk that may be freed, our own deadline.
_TRANSIENT_CODES = {
    5,   # SQLITE_BUSY
    6,   # SQLITE_LOCKED
    9,   # SQLITE_INTERRUPT (our deadline interrupted the statement)
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    15,  # SQLITE_PROTOCOL (WAL lock race)
}
_TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "disk i/o error", "interrupted",
                       "database or disk is full")

T = TypeVar("T")


def catalog_error(exc: BaseException, what: str, path: Path) -> CatalogError:
    """The one mapping from SQLite/OS errors to transient vs permanent catalog errors."""
    if isinstance(exc, CatalogError):
        return exc
    message = f"SQLite catalog {str(path)!r}: {what} failed: {exc}"
    if isinstance(exc, TimeoutError):
        return TransientCatalogError(message)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _TRANSIENT_CODES:
            return TransientCatalogError(message)
        if code is None and isinstance(exc, sqlite3.OperationalError) and any(
                text in str(exc).lower() for text in _TRANSIENT_MESSAGES):
            return TransientCatalogError(message)
        return PermanentCatalogError(message)
    if isinstance(exc, OSError):
        # EIO, ENOSPC, a hung or dead mount… may pass; EACCES, EROFS, a folder that cannot exist will not.
        return (TransientCatalogError if exc.errno in TRANSIENT_OS_ERRNOS else PermanentCatalogError)(message)
    return PermanentCatalogError(message)


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a job nobody awaits any more (else asyncio logs it as never retrieved)."""
    if not future.cancelled():
        future.exception()


def _row_values(doc: FileDocument) -> list[Any]:
    """The `files` row of a document, tags and metadata as JSON text."""
    row = [getattr(doc, name) for name in _COLUMNS[:-2]]  # not to_dict(): its deep copy is wasted here
    try:
        row.append(json.dumps(doc.tags, ensure_ascii=False, allow_nan=False))
        row.append(json.dumps(doc.metadata, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise PermanentCatalogError(f"document {doc.id}: tags/metadata are not JSON: {exc}") from exc
    return row


def _row_to_dict(row: sqlite3.Row) -> dict[str, Any]:
    doc = {name: row[name] for name in _COLUMNS}
    doc["tags"] = json.loads(doc["tags"])
    doc["metadata"] = json.loads(doc["metadata"])
    return doc


class SqliteCatalog(Catalog):
    """The catalog in one local SQLite file (created 0600, its folder 0700 when we create it)."""

    def __init__(self, path: str | Path, *, request_timeout: float = 60.0, power_safe: bool = False) -> None:
        self.path = Path(path)
        self.url = "sqlite://" + str(self.path)
        self.request_timeout = request_timeout
        self.power_safe = power_safe
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SqliteCatalog({str(self.path)!r})"

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        executor = self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="mldash-catalog-sqlite")
        abandoned = threading.Event()
        opened: list[sqlite3.Connection] = []
        try:
            await self._run("open", lambda: opened.append(self._open_sync(abandoned)))
        except BaseException:
            # Cancelled (a daemon stopping while the catalog opens) or failed: the worker stops waiting for the
            # file's lock within one busy step (else the interpreter's exit waits for that thread), and the job
            # queued behind it closes what *this* opening opened — never `_conn`, which a later open() may own.
            abandoned.set()
            executor.submit(lambda: [conn.close() for conn in opened])
            executor.shutdown(wait=False)
            if self._executor is executor:
                self._executor = None
            raise
        self._conn = opened[0]

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        job = asyncio.wrap_future(executor.submit(self._close_sync))
        try:
            async with asyncio.timeout(self.request_timeout):
                await asyncio.shield(job)
        except TimeoutError:
            # A statement is still running: interrupt it; the queued close then runs right after.
            job.add_done_callback(_discard_outcome)
            if self._conn is not None:
                self._conn.interrupt()
            log.warning("SQLite catalog %r: close waited %ss for a running statement; interrupted it",
                        str(self.path), self.request_timeout)
        finally:
            executor.shutdown(wait=False)

    def _open_sync(self, abandoned: threading.Event | None = None) -> sqlite3.Connection:
        """Open and prepare the connection. A lock held by another process is waited for in short steps, not in
        SQLite's busy handler (which sqlite3_interrupt does not end), so that an abandoned opening stops."""
        make_private_dir(self.path.parent)
        if not self.path.exists():
            try:
                fd = open_private(self.path)
            except FileExistsError:  # another process created it just now
                pass
            else:
                os.close(fd)
        # WAL and SHM files inherit the database file's permission bits (SQLite's unix VFS).
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=_OPEN_BUSY_STEP)
        try:
            conn.row_factory = sqlite3.Row
            give_up = time.monotonic() + self._busy_seconds()
            while True:
                try:
                    self._prepare(conn)
                    break
                except sqlite3.OperationalError as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    busy = "locked" in str(exc).lower()  # SQLITE_BUSY / SQLITE_LOCKED: another process holds it
                    if not busy or time.monotonic() >= give_up or (abandoned is not None and abandoned.is_set()):
                        raise
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_seconds() * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """WAL, durability, and the schema (created or checked) on a new connection."""
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives any process crash in WAL mode; FULL also survives power loss.
        conn.execute(f"PRAGMA synchronous={'FULL' if self.power_safe else 'NORMAL'}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise PermanentCatalogError(
                f"SQLite catalog {str(self.path)!r} has schema version {version}; this mldash knows "
                f"up to {SCHEMA_VERSION}: upgrade mldash")
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _busy_seconds(self) -> float:
        # Below the deadline: SQLite's busy wait cannot be interrupted, so it must give up first.
        return max(0.05, self.request_timeout * 0.8)

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` on the catalog thread within the deadline; map every failure to a CatalogError."""
        if self._executor is None:
            raise RuntimeError(f"{self!r} is not open: call `await catalog.open()` first")
        job = self._executor.submit(fn)
        result = asyncio.wrap_future(job)
        try:
            async with asyncio.timeout(self.request_timeout):
                return await asyncio.shield(result)
        except TimeoutError as exc:
            result.add_done_callback(_discard_outcome)
            # Still queued: it will never run. Already running: interrupt its statement (SQLite then
            # rolls the transaction back; the job fails with SQLITE_INTERRUPT, which nobody awaits).
            if not job.cancel() and self._conn is not None:
                self._conn.interrupt()
            raise TransientCatalogError(
                f"SQLite catalog {str(self.path)!r}: {what} took longer than {self.request_timeout}s") from exc
        except (sqlite3.Error, OSError) as exc:
            raise catalog_error(exc, what, self.path) from exc
        except asyncio.CancelledError:
            result.add_done_callback(_discard_outcome)  # the job finishes on its own; nobody reads it
            raise

    # -- the contract ----------------------------------------------------------------------------

    async def _insert(self, docs: Sequence[FileDocument], what: str) -> set[str]:
        """INSERT OR IGNORE every document (and its tags) in one transaction; the ids that were present."""
        rows = [(doc.id, _row_values(doc), sorted(set(doc.tags))) for doc in docs]
        insert = f"INSERT OR IGNORE INTO files ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"

        def write() -> set[str]:
            conn = self._require_conn()
            present: set[str] = set()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for file_id, values, tags in rows:
                    if not conn.execute(insert, values).rowcount:
                        present.add(file_id)
                        continue
                    # only the first writer's tags, to match its row
                    conn.executemany("INSERT OR IGNORE INTO file_tags (file_id, tag) VALUES (?, ?)",
                                     [(file_id, tag) for tag in tags])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return present

        return await self._run(what, write)

    async def get(self, file_id: str) -> dict[str, Any] | None:
        return (await self._select([file_id], f"get of {file_id}")).get(file_id)

    async def get_many(self, file_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not file_ids:
            return {}
        return await self._select(file_ids, f"get of {len(file_ids)} documents")

    async def _select(self, file_ids: Sequence[str], what: str) -> dict[str, dict[str, Any]]:
        ids = list(dict.fromkeys(file_ids))

        def read() -> dict[str, dict[str, Any]]:
            conn, out = self._require_conn(), {}
            for start in range(0, len(ids), _IDS_PER_SELECT):
                chunk = ids[start:start + _IDS_PER_SELECT]
                for row in conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE id IN "
                                        f"({', '.join('?' * len(chunk))})", chunk):
                    out[row["id"]] = _row_to_dict(row)
            return out

        return await self._run(what, read)

    async def find(self, query: FileQuery) -> list[dict[str, Any]]:
        if query.limit is not None and query.limit < 0:
            raise ValueError(f"FileQuery.limit = {query.limit}; use None (no limit) or a count ≥ 0")
        if query.limit == 0:
            return []
        sql = [f"SELECT {', '.join(_COLUMNS)} FROM files WHERE namespace = ? AND project = ? AND experiment = ?"]
        params: list[Any] = [query.namespace, query.project, query.experiment]
        if query.path is not None:
            sql.append("AND path = ?")
            params.append(folder(query.path))
        for tag in query.tags:
            sql.append("AND EXISTS (SELECT 1 FROM file_tags WHERE file_id = files.id AND tag = ?)")
            params.append(tag)
        glob = Glob.parse(query.filename_glob) if query.filename_glob is not None else None
        if glob is not None and glob.exact:
            sql.append("AND filename GLOB ?")
            params.append(glob.sqlite_glob)
        sql.append("ORDER BY createdAt, id")
        if query.limit is not None and (glob is None or glob.exact):
            sql.append("LIMIT ?")
            params.append(query.limit)

        def read() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            # Iterate the cursor (no fetchall): an inexact glob filters while streaming.
            for row in self._require_conn().execute(" ".join(sql), params):
                if glob is not None and not glob.matches(row["filename"]):
                    continue
                out.append(_row_to_dict(row))
                if query.limit is not None and len(out) >= query.limit:
                    break
            return out

        return await self._run("find", read)

    async def ping(self) -> None:
        await self._run("ping", lambda: self._require_conn().execute("SELECT 1").fetchone())

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is closed")
        return self._conn
