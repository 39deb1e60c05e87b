"""Read-your-writes: listing, resolving, downloading and waiting, over the spool, the catalog and the store.

A file is in one or both of two places: the local spool (from the moment its save returned until the daemon
evicts its bytes after commit) and the catalog (from commit on). `list()` merges both, deduplicated by id;
the state comes from the spool index (read-only; no index yet means no daemon ran: "queued"), and an entry
the catalog holds is at least "committed". Bytes are read from the spool when they are still there (no
network, and the only copy before commit), else from the store; either way they are checked against the
SHA256 recorded at save time before the destination file appears.

Deferred checksums (settings.checksum = "deferred"): a save records no SHA256. A spooled entry shows the one
the daemon computed (the index row's sha256) once it has read the bytes, else `checksum: None` with
`checksumPending: True`; a download from the spool of such an entry is a plain copy, NOT verified (there is
nothing to verify it against). Committed entries carry the catalog's checksum and are verified as always.

The client is synchronous but the catalog and store are asyncio clients: each call runs on a fresh event
loop in a worker thread, which creates, uses and closes its client there. That works from a plain script and
from inside a running event loop (Jupyter) alike, and never leaks a client across loops. Every catalog and
store await has a deadline (`request_timeout`; downloads add time in proportion to their size). A catalog that
cannot be reached within CATALOG_READ_TIMEOUT is skipped for CATALOG_RETRY_AFTER (see `_catalog_call`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlparse

from mldash import names
from mldash.config import Settings
from mldash.errors import (
    CatalogUnavailableError,
    CommittedElsewhereError,
    InvalidInputError,
    MldashError,
    NotFoundError,
    SpoolCorruptError,
    UploadFailedError,
    WaitTimeoutError,
)
from mldash.redact import redact_uri
from mldash.spool.index import SpoolIndex, read_heartbeat
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import is_held
from mldash.spool.manifest import Manifest
from mldash.spool.recovery import manifest_ids, open_spooled, read_manifest
from mldash.spool.states import TERMINAL, State
from mldash.targets import asked_targets, committed_elsewhere

log = logging.getLogger("mldash")

# Seconds a wait goes on before it says (once, as a warning) why it does not end, if something is known to hold
# it up: no daemon draining the spool, or one that cannot reach the store or the catalog.
STUCK_WAIT_WARNING = 10.0
T = TypeVar("T")

_COPY_CHUNK = 8 * 2**20
# A client read waits this long for the catalog to be reachable before answering from the spool alone: the training
# loop, not a daemon, is waiting (a reachable catalog then gets request_timeout for the read itself, a large listing
# included). After a failure the catalog is skipped for CATALOG_RETRY_AFTER seconds.
CATALOG_READ_TIMEOUT = 5.0
CATALOG_RETRY_AFTER = 30.0
_MIN_DOWNLOAD_RATE = 5e6  # bytes/s assumed at worst when sizing a download's deadline
_FAILED = (State.FAILED, State.QUARANTINED)


@dataclass(frozen=True)
class ExperimentId:
    namespace: str
    project: str
    experiment: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.project}/{self.experiment}"


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in a worker thread and return its result (or raise its error)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mldash-read") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _public_from_manifest(manifest: Manifest) -> dict[str, Any]:
    return manifest.to_public()


def _public_from_document(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if not k.startswith("_")}  # Mongo's _id and the like
    out["id"] = str(out["id"])
    out["checksumPending"] = out.get("checksum") is None
    return out


def _parse_id(value: int | str) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    text = value.strip()
    # ASCII digits only: str.isdigit() is also true for "²" (int() refuses it) and for other scripts' digits,
    # which are file names here, not ids.
    return int(text) if text.isascii() and text.isdigit() else None


def _under(path: str, prefix: str, recursive: bool) -> bool:
    folder = "/" + prefix
    if path == folder:
        return True
    return recursive and (prefix == "" or path.startswith(folder + "/"))


class Reader:
    """Read access for one Settings; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = SpoolLayout(settings.spool)
        self._manifests: dict[int, Manifest] = {}  # manifests never change once in place: cache them
        self._lock = threading.Lock()
        # (monotonic time until which the catalog is skipped, why, the error to raise meanwhile)
        self._catalog_down: tuple[float, str, type[Exception]] = (0.0, "", Exception)
        self._warned_catalog_down = 0.0  # the down_until of the outage last warned about

    # ---- the spool side --------------------------------------------------------------------------------
    def _manifest(self, file_id: int) -> Manifest | None:
        with self._lock:
            cached = self._manifests.get(file_id)
        if cached is not None:
            return cached
        try:
            manifest = read_manifest(self.layout, file_id)
        except SpoolCorruptError as exc:
            if self.layout.manifest_path(file_id).exists():
                log.debug("skipping unreadable manifest %s: %s", file_id, exc)
            return None
        with self._lock:
            self._manifests[file_id] = manifest
        return manifest

    def _followed_rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """`_index_rows`, with an entry that was re-saved under a new id (its id was another file's: spool/resave.py)
        answered by the entry it became — what a caller holding the old id means."""
        rows = self._index_rows(ids)
        for file_id in ids:
            seen = {file_id}
            row = rows.get(file_id)
            while row is not None and row["state"] == State.RESAVED and row.get("resaved_as") not in (None, *seen):
                seen.add(row["resaved_as"])
                row = self._index_rows([row["resaved_as"]]).get(row["resaved_as"])
            if row is not None:
                rows[file_id] = row
            else:
                rows.pop(file_id, None)
        return rows

    def _index_rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = list(ids)
        if not ids or not self.layout.exists():
            return {}
        index = SpoolIndex.open_readonly(self.layout)
        if index is None:
            return {}
        try:
            rows: dict[int, dict[str, Any]] = {}
            for start in range(0, len(ids), 500):
                for row in index.rows(ids=ids[start:start + 500]):
                    rows[row["id"]] = row
            return rows
        except Exception as exc:  # a locked/half-created index must not break a read: report states as unknown
            log.debug("spool index unreadable: %s", exc)
            return {}
        finally:
            index.close()

    def spool_entries(self, exp: ExperimentId) -> dict[int, dict[str, Any]]:
        """Every entry of `exp` whose manifest is in the spool, with its state."""
        if not self.layout.exists():
            return {}
        present = manifest_ids(self.layout)
        with self._lock:  # forget manifests that are gone (evicted or collected)
            for stale in set(self._manifests) - present:
                del self._manifests[stale]
        mine: dict[int, Manifest] = {}
        for file_id in present:
            manifest = self._manifest(file_id)
            if manifest is not None and (manifest.namespace, manifest.project, manifest.experiment) == (
                    exp.namespace, exp.project, exp.experiment):
                mine[file_id] = manifest
        rows = self._index_rows(mine)
        return {file_id: self._with_state(_public_from_manifest(m), rows.get(file_id))
                for file_id, m in mine.items()}

    @staticmethod
    def _with_state(entry: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
        entry["status"] = row["state"] if row else State.QUEUED.value
        if entry["checksum"] is None and row and row.get("sha256"):  # deferred: computed by the daemon
            entry["checksum"] = row["sha256"]
        entry["checksumPending"] = entry["checksum"] is None
        if row and row["state"] in (State.FAILED.value, State.QUARANTINED.value, State.QUEUED.value) and row.get(
                "last_error"):
            entry["lastError"] = row["last_error"]
        if row and row.get("committed_at"):
            entry["committedAt"] = row["committed_at"]
        return entry

    # ---- the catalog side ------------------------------------------------------------------------------
    def _catalog_exists(self) -> bool:
        """False when the embedded SQLite catalog was never created (no daemon committed anything yet):
        a reader must not create it."""
        parsed = urlparse(self.settings.catalog)
        return parsed.scheme != "sqlite" or Path(unquote(parsed.path)).exists()

    def _catalog_call(self, call: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run `call(catalog)`, giving the catalog CATALOG_READ_TIMEOUT to be reachable. After it could not be
        reached, it is skipped (the same error raised at once) for CATALOG_RETRY_AFTER seconds, so a loop that lists
        every epoch during an outage does not wait each time."""
        from mldash.catalog import make_catalog
        from mldash.catalog.base import CatalogError, TransientCatalogError

        with self._lock:
            down_until, reason, error_type = self._catalog_down
        if time.monotonic() < down_until:
            raise error_type(reason)
        reach = min(self.settings.request_timeout, CATALOG_READ_TIMEOUT)
        deadline = reach + self.settings.request_timeout  # reaching a server, then the read itself

        async def run() -> T:
            catalog = make_catalog(self.settings, for_reads=True, selection_timeout=reach)
            # The catalog's own deadlines (reaching a server: `reach`) normally answer first, with their reason.
            async with asyncio.timeout(deadline + 1.0):
                await catalog.open()
            try:
                async with asyncio.timeout(deadline + 1.0):
                    return await call(catalog)
            finally:
                async with asyncio.timeout(deadline + 1.0):
                    await catalog.close()

        try:
            return run_async(run)
        except (TransientCatalogError, TimeoutError, OSError) as exc:  # unreachable: remembered for a while
            # A CatalogError names the catalog already; a bare timeout says nothing at all.
            cause = str(exc) if isinstance(exc, CatalogError) and str(exc) else (
                f"the catalog {redact_uri(self.settings.catalog)} could not be read: "
                f"{str(exc) or f'no answer within {deadline:g}s'}")
            reason = f"{cause} (not asked again for {CATALOG_RETRY_AFTER:g}s)"
            error_type = type(exc) if isinstance(exc, TransientCatalogError) else TransientCatalogError
            with self._lock:
                self._catalog_down = (time.monotonic() + CATALOG_RETRY_AFTER, reason, error_type)
            raise error_type(reason) from exc

    def _warn_catalog_down(self, exc: BaseException, consequence: str) -> None:
        """One warning per outage (a loop that lists every epoch would repeat it); the rest at debug level. Errors
        that are not an outage (a missing driver, bad credentials) are not remembered: warned every time."""
        with self._lock:
            down_until, reason, _ = self._catalog_down
            remembered = bool(reason) and str(exc) == reason
            first = not remembered or down_until != self._warned_catalog_down
            if remembered:
                self._warned_catalog_down = down_until
        message = str(exc) or f"{type(exc).__name__} from the catalog {redact_uri(self.settings.catalog)}"
        log.log(logging.WARNING if first else logging.DEBUG, "mldash: %s; %s", message, consequence)

    def catalog_find(self, exp: ExperimentId, **query: Any) -> list[dict[str, Any]]:
        if not self._catalog_exists():
            return []
        from mldash.catalog.base import FileQuery

        q = FileQuery(namespace=exp.namespace, project=exp.project, experiment=exp.experiment, **query)
        return [_public_from_document(d) for d in self._catalog_call(lambda c: c.find(q))]

    def catalog_get(self, file_id: int) -> dict[str, Any] | None:
        if not self._catalog_exists():
            return None
        doc = self._catalog_call(lambda c: c.get(str(file_id)))
        return _public_from_document(doc) if doc else None

    # ---- merged views ----------------------------------------------------------------------------------
    def entries(self, exp: ExperimentId, *, path: str | None = None, tags: list[str] | None = None,
                strict: bool = False) -> dict[int, dict[str, Any]]:
        """Spool and catalog entries of `exp`, by id. If the catalog cannot be reached the spool's entries are
        returned alone and a warning is logged (strict=True raises instead)."""
        entries = self.spool_entries(exp)
        try:
            docs = self.catalog_find(exp, path=path, tags=tuple(tags or ()))
        except Exception as exc:
            if strict:
                raise
            self._warn_catalog_down(exc, "showing only the files still in the local spool")
            docs = []
        # Entries evicted from the spool are known only to the catalog; the index still says "evicted".
        rows = self._index_rows(int(d["id"]) for d in docs if int(d["id"]) not in entries)
        for doc in docs:
            file_id = int(doc["id"])
            known = entries.get(file_id)
            if known is not None:
                status = known["status"] if known["status"] in TERMINAL else State.COMMITTED.value
            else:
                row = rows.get(file_id)  # a resaved row of ours under this id is not this document's file
                status = row["state"] if row and row["state"] in TERMINAL else State.COMMITTED.value
            entries[file_id] = {**(known or {}), **doc, "status": status}
            entries[file_id].pop("lastError", None)
        return entries

    def list(self, exp: ExperimentId, *, prefix: str = "", recursive: bool = True, tags: list[str] | None = None,
             pattern: str | None = None, status: str | None = None, strict: bool = False) -> list[dict[str, Any]]:
        if status is not None and status not in {s.value for s in State}:
            raise InvalidInputError(f"status={status!r}; accepted: {', '.join(s.value for s in State)}")
        if pattern is not None and not isinstance(pattern, str):
            raise InvalidInputError(f"pattern must be a glob str such as '*.pt', got {type(pattern).__name__}")
        path = None if recursive else "/" + prefix
        wanted = set(tags or ())
        out = []
        for entry in self.entries(exp, path=path, tags=list(wanted), strict=strict).values():
            if not _under(entry["path"], prefix, recursive) or not wanted <= set(entry.get("tags") or ()):
                continue
            if pattern is not None:
                subject = entry["path"].rstrip("/") + "/" + entry["filename"] if "/" in pattern else entry["filename"]
                if not fnmatch.fnmatchcase(subject, pattern):
                    continue
            if status is not None and entry["status"] != status:
                continue
            out.append(entry)
        return sorted(out, key=lambda e: int(e["id"]))

    def resolve(self, exp: ExperimentId, ref: int | str, *, base: str = "") -> dict[str, Any]:
        """The entry for an id, or for a path (its newest version). Relative paths start at `base`."""
        file_id = _parse_id(ref) if isinstance(ref, (int, str)) else None
        if file_id is not None:
            return self._resolve_id(exp, file_id)
        if isinstance(ref, int) and not isinstance(ref, bool):
            raise InvalidInputError(f"file ids are positive integers, got {ref}")
        if not isinstance(ref, str):
            raise InvalidInputError(f"a file is named by its id or its path, got {type(ref).__name__}")
        text = ref.strip()
        folder, _, filename = text.rpartition("/")
        # Reading names a file that exists, maybe saved by an older client under laxer rules: path safety only.
        filename = names.validate_segment(filename, "filename", stored=True)
        prefix = names.validate_prefix(folder, stored=True) if text.startswith("/") else names.validate_prefix(
            f"{base}/{folder}" if base and folder else base or folder, stored=True)
        path = "/" + prefix
        shown = path.rstrip("/") + "/" + filename
        try:
            found = self.entries(exp, path=path, strict=True)
        except CatalogUnavailableError as exc:
            # The spool may still hold the file; if not, nobody can say it does not exist: no NotFoundError.
            spooled = [e for e in self.spool_entries(exp).values() if e["path"] == path and e["filename"] == filename]
            if not spooled:
                raise CatalogUnavailableError(f"cannot tell whether {shown!r} exists in experiment {exp}: it is not "
                                              f"in the local spool, and {exc}") from exc
            self._warn_catalog_down(exc, f"using the spool's newest {shown!r} (a newer one may be committed)")
            found = {int(e["id"]): e for e in spooled}
        candidates = [e for e in found.values() if e["path"] == path and e["filename"] == filename]
        if not candidates:
            raise NotFoundError(f"no file {shown!r} in experiment {exp} (neither in the spool nor in the catalog)")
        return max(candidates, key=lambda e: int(e["id"]))

    def _resolve_id(self, exp: ExperimentId, file_id: int) -> dict[str, Any]:
        became = self._followed_rows([file_id]).get(file_id)
        if became is not None and became["id"] != file_id:
            # Our save, re-saved under a new id: the catalog's file under this id is another one (spool/resave.py).
            log.info("mldash: file %s was re-saved as %s (its id belonged to another file)", file_id, became["id"])
            return self._resolve_id(exp, became["id"])
        entry: dict[str, Any] | None = None
        manifest = self._manifest(file_id) if self.layout.exists() else None
        if manifest is not None:
            entry = self._with_state(_public_from_manifest(manifest), self._index_rows([file_id]).get(file_id))
        if entry is None or entry["status"] in TERMINAL:
            try:
                doc = self.catalog_get(file_id)
            except Exception as exc:
                if entry is None:
                    if isinstance(exc, CatalogUnavailableError):
                        raise CatalogUnavailableError(f"cannot tell whether file {file_id} exists: it is not in the "
                                                      f"local spool, and {exc}") from exc
                    raise
                self._warn_catalog_down(exc, f"using the spool's record of {file_id}")
                doc = None
            if doc is not None:
                status = entry["status"] if entry else State.COMMITTED.value
                entry = {**(entry or {}), **doc, "status": status}
        if entry is None:
            raise NotFoundError(f"no file with id {file_id} (neither in the spool nor in the catalog)")
        owner = f"{entry['namespace']}/{entry['project']}/{entry['experiment']}"
        if owner != str(exp):
            raise NotFoundError(f"file {file_id} belongs to experiment {owner}, not to {exp}")
        return entry

    # ---- bytes -------------------------------------------------------------------------------------------
    def download(self, entry: dict[str, Any], dest: str | os.PathLike[str] | None, *, overwrite: bool = True) -> str:
        target = _destination(dest, entry["filename"])
        if target.exists() and not overwrite:
            raise FileExistsError(f"{str(target)!r} exists; pass overwrite=True to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        file_id = int(entry["id"])
        temp = target.parent / f".mldash-{uuid.uuid4().hex}.part"
        try:
            found = self._copy_from_spool(file_id, entry.get("checksum"), temp)
            if found != "ok":
                self._copy_from_store(entry, temp, spool_corrupt=found == "corrupt")
            if self.settings.power_safe:
                with open(temp, "rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return str(target)

    def _copy_from_spool(self, file_id: int, checksum: str | None, temp: Path) -> str:
        """Copy the spooled bytes if they are still there (an open file survives eviction).

        Returns "ok", "missing" (evicted, or no spool here) or "corrupt" (bytes differ from their SHA256).
        `checksum` None (a deferred-checksum entry the daemon has not read yet): the copy is not verified."""
        try:
            source = open_spooled(self.layout, file_id)
        except FileNotFoundError:
            return "missing"
        with source, open(temp, "wb") as out:
            digest = hashlib.sha256()
            while chunk := source.read(_COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if checksum is None:
            log.info("mldash: file %s has no checksum yet (deferred): copied from the spool unverified", file_id)
            return "ok"
        if digest.hexdigest() != checksum:
            log.error("mldash: spooled bytes of %s do not match their SHA256; trying the store", file_id)
            return "corrupt"
        return "ok"

    def _copy_from_store(self, entry: dict[str, Any], temp: Path, *, spool_corrupt: bool = False) -> None:
        file_id = int(entry["id"])
        key, expected = entry.get("storageKey"), entry.get("checksum")
        if key is None or expected is None:
            doc = self.catalog_get(file_id)
            key = key or (doc.get("storageKey") if doc else None)
            expected = expected or (doc.get("checksum") if doc else None)
        if key is None:
            state = entry.get("status", "queued")
            if spool_corrupt:
                raise SpoolCorruptError(f"the spooled bytes of file {file_id} do not match the SHA256 recorded when it "
                                        f"was saved, and it is not committed (state {state!r}): nothing to download. "
                                        "The daemon quarantines such entries; see `mldash-syncd status`")
            raise NotFoundError(f"the bytes of file {file_id} are not in the spool any more and it is not committed "
                                f"(state {state!r}); see `mldash-syncd status`")
        from mldash.store import make_store

        deadline = self.settings.request_timeout + int(entry.get("sizeBytes") or 0) / _MIN_DOWNLOAD_RATE

        async def run() -> None:
            store = make_store(self.settings)
            async with asyncio.timeout(self.settings.request_timeout):
                await store.open()
            try:
                async with asyncio.timeout(deadline):
                    await store.download(key, temp)
            finally:
                async with asyncio.timeout(self.settings.request_timeout):
                    await store.close()

        from mldash.store.base import StoreError, TransientStoreError

        where = f"file {file_id}: download of {key!r} from the store {self.settings.store}"
        recorded = entry.get("storageUri")
        if recorded and not str(recorded).startswith(self.settings.store.rstrip("/") + "/"):
            where += f" (the catalog recorded it at {recorded}: has the store setting changed?)"
        try:
            run_async(run)
        except StoreError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except TimeoutError:
            raise TransientStoreError(f"{where}: no answer within {deadline:.0f}s (request_timeout "
                                      f"{self.settings.request_timeout:g}s plus time for its size)") from None
        digest = hashlib.sha256()
        with open(temp, "rb", buffering=0) as handle:
            while chunk := handle.read(_COPY_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise MldashError(f"file {file_id}: the store returned bytes whose SHA256 does not match the catalog "
                              f"({digest.hexdigest()} != {expected}); nothing was written")

    # ---- waiting -------------------------------------------------------------------------------------------
    def wait(self, ids: list[int], timeout: float | None, *, poll_max: float = 0.5,
             on_poll: Callable[[], object] | None = None) -> dict[str, str]:
        """Poll the index until every id is committed or evicted (see `FilesHandle.wait`).

        `on_poll` runs before every poll (the experiment uses it to restart an autostarted daemon that died)."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        delay = 0.02
        warned = False
        while True:
            if on_poll is not None:
                on_poll()
            rows = self._followed_rows(ids)
            failures = {i: f"{rows[i]['state']}: {rows[i].get('last_error') or 'no reason recorded'}"
                        for i in ids if i in rows and rows[i]["state"] in _FAILED}
            if failures:
                listed = "; ".join(f"{i} {reason}" for i, reason in failures.items())
                raise UploadFailedError(f"{len(failures)} file(s) could not be uploaded: {listed}. The bytes are "
                                        "kept in the spool: fix the cause, then run `mldash-syncd retry`",
                                        failures=failures)
            done = {i: rows[i]["state"] for i in ids if i in rows and State(rows[i]["state"]) in TERMINAL}
            self._check_committed_here({i: rows[i] for i in done})
            pending = [i for i in ids if i not in done]
            done.update(self._committed_without_index(pending))
            pending = [i for i in ids if i not in done]
            if not pending:
                return {str(i): state for i, state in done.items()}
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(self._timeout_message(pending, len(ids), timeout or 0.0), pending=pending)
            if not warned and time.monotonic() - started >= STUCK_WAIT_WARNING:
                # Say once why the wait does not end — a wait without a timeout would otherwise be silent forever.
                if why := self._why_stuck():
                    log.warning("waiting for %d file(s) to be committed: %s", len(pending), why.text)
                warned = True
            pause = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 2, poll_max)

    def _check_committed_here(self, rows: dict[int, dict[str, Any]]) -> None:
        """Committed is not enough: committed by a daemon that sends where these settings read (mldash/targets.py).
        A row without the record (committed before it was kept) is taken as it is."""
        ours = asked_targets(self.settings)
        elsewhere = {i: where for i, row in rows.items()
                     if (where := committed_elsewhere(ours, row.get("committed_to"))) is not None}
        if elsewhere:
            first = next(iter(elsewhere.values()))
            raise CommittedElsewhereError(
                f"{len(elsewhere)} file(s) were committed by a daemon that sends to {first}: delivered, but not "
                "where this process's settings read them. Give the daemon (systemd unit, job environment) and this "
                f"process the same store and catalog settings; ids: {', '.join(map(str, list(elsewhere)[:20]))}",
                elsewhere=elsewhere)

    def _committed_without_index(self, pending: list[int]) -> dict[int, str]:
        """Entries whose manifest and index row are both gone (collected after commit): ask the catalog."""
        gone = [i for i in pending if not self.layout.manifest_path(i).exists()]
        if not gone:
            return {}
        rows = self._index_rows(gone)
        found = {}
        for file_id in gone:
            if file_id in rows:
                continue
            with contextlib.suppress(Exception):
                if self.catalog_get(file_id) is not None:
                    found[file_id] = State.COMMITTED.value
        return found

    def _timeout_message(self, pending: list[int], total: int, timeout: float) -> str:
        shown = ", ".join(map(str, pending[:20])) + (" …" if len(pending) > 20 else "")
        message = f"{len(pending)} of {total} file(s) not committed after {timeout:g}s: {shown}."
        why = self._why_stuck()
        if why is not None and why.no_daemon:  # nothing will upload them until a daemon runs: say only that
            return f"{message} {why.text[0].upper()}{why.text[1:]}"
        message += " They stay queued and will be uploaded"
        return message + (f", but {why.text}" if why else "; `mldash-syncd status` shows progress.")

    def _why_stuck(self) -> StuckReason | None:
        """Why pending entries may not move: no daemon, or one that cannot reach the store or the catalog (from
        its heartbeat). None when nothing is known to hold them up."""
        if not self.layout.exists():
            return None
        if not is_held(self.layout):
            why = f"no mldash-syncd is draining the spool {self.layout.root}"
            if not self.settings.autostart:
                return StuckReason(why + ": start one with `mldash-syncd run` (autostart is off: MLDASH_AUTOSTART=0).",
                                   no_daemon=True)
            from mldash.autostart import last_log_line

            last = last_log_line(self.layout)
            return StuckReason(why + (f"; the last one autostarted said: {last} ({self.layout.daemon_log_path})."
                                      if last else f"; autostart is on: see {self.layout.daemon_log_path}."),
                               no_daemon=True)
        beat = read_heartbeat(self.layout)
        for part, key in (("store", "storeGate"), ("catalog", "catalogGate")):
            if beat.get(key):
                return StuckReason(f"mldash-syncd cannot reach the {part}: {beat[key]} (it retries; "
                                   "`mldash-syncd status`).", no_daemon=False)
        return None



class StuckReason(NamedTuple):
    """Why a wait for commits may not end by itself (see `_why_stuck`)."""
    text: str
    no_daemon: bool  # no daemon drains the spool: nothing will upload the entries until one runs


def _destination(dest: str | os.PathLike[str] | None, filename: str) -> Path:
    if dest is None:
        return Path.cwd() / filename
    if not isinstance(dest, (str, os.PathLike)):
        raise InvalidInputError(f"dest_path must be a str or os.PathLike, got {type(dest).__name__} {dest!r}")
    text = os.fspath(dest)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidInputError(f"dest_path {dest!r} is not a usable path")
    path = Path(os.path.expanduser(text))
    if path.is_dir() or text.endswith(os.sep):
        return path / filename
    return path
