"""`MongoCatalog`: the catalog in MongoDB, through PyMongo's asyncio API (`pymongo.AsyncMongoClient`).

Collection ``files`` in the configured database, one document per file version with ``_id`` = the
id string (plus the ``id`` field itself, unique-indexed, as ML-Dash documents carry it). Indexes:
``id`` (unique), (namespace, project, experiment, path, createdAt) for folder listings,
(namespace, project, experiment, createdAt, id) for whole-experiment listings in order, and
(namespace, project, experiment, tags) — multikey — for tag filters; every query is scoped to one
experiment, so the experiment leads every index.

Writes: ``insert_many(docs, ordered=False)`` with ``_id`` = the id — the first writer wins and a replay
changes nothing: a duplicate-key write error means "already there", i.e. success, and its id is reported
back (`upsert_many`) so the daemon can tell a replay from an id clash without reading every document
(not update + $setOnInsert, which mongod refuses for "$"-prefixed metadata keys). One request per batch.
Write concern ``w="majority", j=True``: the write is in the journal before it is acknowledged (SecantusDB's
and mongod's defaults are not).

Deadlines: the client runs with ``timeoutMS`` = `request_timeout` (PyMongo's client-side operation
timeout, which also bounds server selection, connecting and the driver's own retries), and every await
is additionally wrapped in ``asyncio.timeout(request_timeout + DEADLINE_GRACE)`` as the backstop: the
driver's timeout normally fires first and says more. The URI's ``timeoutMS`` and ``socketTimeoutMS`` give way
to `request_timeout` (with a warning, once): the backstop and the daemon's retries are built on that one
deadline. The URI's ``serverSelectionTimeoutMS`` and ``connectTimeoutMS`` are the user's and are kept;
``serverSelectionTimeoutMS`` also replaces SERVER_SELECTION_TIMEOUT as mldash's own wait for a server (see
`_deadline`: with ``timeoutMS`` set, PyMongo itself would let it wait the whole operation timeout).
`catalog_error` is the one place that decides transient vs permanent. A driver call is never cancelled while
its client is open: a caller that stops waiting (its deadline, a daemon stopping) leaves it to end by its own
timeout, or at `close` — see `_deadline` for why.

The client is bound to the event loop that ran `open()`; use and close the catalog on that loop.
The URI's password never leaves this object: `url` and `repr()` show it as ``***``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import bson.errors
import pymongo
from pymongo import ASCENDING, AsyncMongoClient, IndexModel, ReadPreference, WriteConcern, common, uri_parser
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
)

from mldash.catalog.base import (
    Catalog,
    CatalogError,
    FileDocument,
    FileQuery,
    PermanentCatalogError,
    TransientCatalogError,
)
from mldash.catalog.query import Glob, folder
from mldash.redact import redact_uri, scrub_secrets, uri_password

log = logging.getLogger(__name__)

COLLECTION = "files"
DUPLICATE_KEY = 11000  # the server error code of a unique-index violation
DEADLINE_GRACE = 1.0  # seconds the outer asyncio deadline waits beyond the driver's own timeoutMS
CLOSE_SESSIONS_TIMEOUT = 1.0  # seconds `close` gives the endSessions command (see _close_client)
ABANDONED_CALLS_GRACE = 2.0  # seconds `close` waits for abandoned calls (server selection wakes every 0.5 s)
# Seconds `open` gives the index creation: a reachable server answers in milliseconds (bad credentials too);
# one that is down must not hold a starting daemon — and its uploads — for the whole request timeout.
OPEN_TIMEOUT = 3.0
# Seconds an operation may take while no server is known to be up (PyMongo retries a refused or dropped one until
# its deadline). Long enough to connect and for a replica set election (~10 s); short enough that a MongoDB that is
# down is reported (logs, `status`) after seconds, not after the whole request timeout. Commits are retried anyway.
SERVER_SELECTION_TIMEOUT = 15.0
# URI options that `request_timeout` replaces, by lower-cased name (MongoDB's option names are case-insensitive).
_REPLACED_TIMEOUTS = {"timeoutms": "timeoutMS", "sockettimeoutms": "socketTimeoutMS"}
_warned_replaced: set[tuple[str, ...]] = set()  # (catalog URL, options...) already warned about in this process

# Server error codes that mean "the credentials are wrong or lack a role": never fixed by waiting.
_AUTH_CODES = frozenset({
    13,    # Unauthorized
    18,    # AuthenticationFailed
    8000,  # AtlasError ("bad auth")
})

# Server error codes after which the same request can succeed later (node state, elections,
# network between nodes, time limits, lock contention). Anything else from the server is permanent.
_TRANSIENT_CODES = frozenset({
    6, 7, 89, 9001, 202, 262,              # HostUnreachable, HostNotFound, NetworkTimeout, SocketException,
                                           # NetworkInterfaceExceededTimeLimit, ExceededTimeLimit
    91, 11600, 11602, 189,                 # ShutdownInProgress, InterruptedAtShutdown, …DueToReplStateChange,
                                           # PrimarySteppedDown
    10107, 13435, 13436, 10058,            # not primary / not secondary
    50, 64, 134, 133,                      # MaxTimeMSExpired, WriteConcernFailed, ReadConcernMajority…,
                                           # FailedToSatisfyReadPreference
    24, 46, 112, 11601,                    # LockTimeout, LockBusy, WriteConflict, Interrupted
    63, 150, 13388,                        # StaleShardVersion, StaleEpoch, StaleConfig (sharded clusters)
    462,                                   # IngressRequestRateLimitExceeded
})
_TRANSIENT_LABELS = ("RetryableWriteError", "TransientTransactionError", "RetryableError",
                     "SystemOverloadedError")

T = TypeVar("T")

# The order documents are returned in: FileDocument's field order, whatever order the server keeps
# (the server may keep fields in its own order).
_FIELDS = tuple(f.name for f in dataclasses.fields(FileDocument))


def _ordered(doc: dict[str, Any]) -> dict[str, Any]:
    return {name: doc[name] for name in _FIELDS if name in doc}

def catalog_error(exc: BaseException, what: str, url: str) -> CatalogError:
    """The one mapping from driver/network failures to `TransientCatalogError`/`PermanentCatalogError`.

    Transient: the server cannot be selected or reached, a connection broke or timed out, the node is
    not (or no longer) primary, the operation ran out of time, or the server labelled the error as
    retryable. Permanent: authentication/authorization, configuration (bad URI, missing TLS files),
    invalid documents and any other server error.
    """
    if isinstance(exc, CatalogError):
        return exc
    # PyMongo appends its whole topology description (~600 characters, repeating the cause) to selection errors.
    text = str(exc).split(", Topology Description: ", 1)[0]
    message = f"MongoDB catalog {url}: {what} failed: {type(exc).__name__}: {text}"
    if isinstance(exc, TimeoutError):
        return TransientCatalogError(f"MongoDB catalog {url}: {what} did not finish within its deadline")
    if isinstance(exc, OperationFailure):  # includes WriteError, WriteConcernError, ExecutionTimeout
        if exc.code in _AUTH_CODES:
            return PermanentCatalogError(message)
        if exc.timeout or exc.code in _TRANSIENT_CODES or any(exc.has_error_label(label)
                                                                for label in _TRANSIENT_LABELS):
            return TransientCatalogError(message)
        return PermanentCatalogError(message)
    if isinstance(exc, ConnectionFailure):  # AutoReconnect, NetworkTimeout, NotPrimaryError, ServerSelection…
        return TransientCatalogError(message)
    if isinstance(exc, PyMongoError) and exc.timeout:  # client-side operation timeout (timeoutMS)
        return TransientCatalogError(message)
    if isinstance(exc, ConfigurationError | PyMongoError | bson.errors.BSONError):
        return PermanentCatalogError(message)
    if isinstance(exc, OSError):
        return TransientCatalogError(message)
    return PermanentCatalogError(message)


def uri_problem(uri: str) -> str | None:
    """What PyMongo would refuse in a MongoDB URI — its credentials' escaping, an option it does not know, an
    option's value — in words that name the option; None when it accepts the URI. Nothing is connected to or
    looked up (a mongodb+srv host is not resolved), so `status` and the daemon's start can check it at once
    rather than fail or only warn at the first connection. Values are never echoed (an option may hold a secret).
    """
    parts = urlsplit(uri)
    userinfo = parts.netloc.rpartition("@")[0]
    try:
        if userinfo:
            uri_parser.parse_userinfo(userinfo)
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
        for name in names:
            # PyMongo does not name an unknown option (a malformed URI could make a key of credential text);
            # a user fixing a typo needs the name, and the URI's password never reaches this message (scrubbed).
            if name.lower() not in common.URI_OPTIONS_VALIDATOR_MAP and name.lower() not in _OPTION_ALIASES:
                close = difflib.get_close_matches(name.lower(), list(common.URI_OPTIONS_VALIDATOR_MAP), n=1)
                hint = f"; did you mean {close[0]!r}? (names are case-insensitive)" if close else ""
                return f"unknown option {name!r}{hint}"
        if parts.query:
            uri_parser.split_options(parts.query, validate=True, warn=False)
        if parts.scheme == "mongodb":
            uri_parser.parse_uri(uri, validate=True, warn=False)  # hosts and ports; no DNS for mongodb://
    except (ConfigurationError, ValueError) as exc:  # InvalidURI is a ConfigurationError
        return scrub_secrets(str(exc), uri_password(uri))
    return None


_OPTION_ALIASES = frozenset(uri_parser.INTERNAL_URI_OPTION_NAME_MAP)  # "ssl" for "tls"


def _uri_options(uri: str) -> dict[str, str]:
    """The options a MongoDB URI sets, by lower-cased name (MongoDB's option names are case-insensitive)."""
    try:
        return {name.lower(): value for name, value in parse_qsl(urlsplit(uri).query)}
    except ValueError:  # not even a URL: PyMongo says what is wrong with it, at open
        return {}


def _seconds(milliseconds: str | None) -> float | None:
    """A URI's positive time in milliseconds, in seconds; None for anything else (PyMongo refuses what is invalid)."""
    try:
        seconds = float(milliseconds or "nan") / 1000
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _duplicates(exc: BulkWriteError, bodies: list[dict[str, Any]], what: str, url: str) -> set[str]:
    """The ids an unordered insert found already present (duplicate key: a replay, or the id is taken).
    Any other write error fails the call, classified like a single error; so does a write concern error
    (the inserted documents may not be durable: the caller retries, and they come back as present)."""
    details = exc.details or {}
    errors = details.get("writeErrors") or []
    others = [error for error in errors if error.get("code") != DUPLICATE_KEY]
    concern = details.get("writeConcernErrors") or []
    if not others and not concern:
        return {bodies[error["index"]]["_id"] for error in errors}
    first = (others or concern)[0]
    message = (f"MongoDB catalog {url}: {what} failed: {'write' if others else 'write concern'} error "
               f"{first.get('code')}: {first.get('errmsg')}")
    if concern or first.get("code") in _TRANSIENT_CODES:
        raise TransientCatalogError(message)
    raise PermanentCatalogError(message)


class MongoCatalog(Catalog):
    """The catalog in MongoDB (or anything speaking its wire protocol, e.g. SecantusDB)."""

    def __init__(self, uri: str, *, database: str = "mldash", request_timeout: float = 60.0,
                 appname: str = "mldash", create_indexes: bool = True,
                 selection_timeout: float | None = None) -> None:
        """`selection_timeout`: the longest an operation waits for a reachable server when none is known to be up
        (see _deadline). The URI's serverSelectionTimeoutMS if it has one, else SERVER_SELECTION_TIMEOUT; a caller's
        value (a client's reads wait less) bounds it."""
        self._uri = uri
        self._uri_options = _uri_options(uri)
        self.url = redact_uri(uri)
        self._secrets = uri_password(uri)
        self.database = database
        self.request_timeout = request_timeout
        self.appname = appname
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._files: AsyncCollection[dict[str, Any]] | None = None
        self._indexes_ready = False
        self._create_indexes = create_indexes  # False for a reader: reads need none, and must not wait for them
        given = _seconds(self._uri_options.get("serverselectiontimeoutms"))
        own = SERVER_SELECTION_TIMEOUT if given is None else given
        self.selection_timeout = own if selection_timeout is None else min(own, selection_timeout)  # see _deadline
        self._abandoned: set[asyncio.Task[Any]] = set()  # driver calls whose caller stopped waiting

    def __repr__(self) -> str:
        return f"MongoCatalog({self.url!r}, database={self.database!r})"

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client (on this event loop) and the indexes.

        An unreachable server does not make `open` fail, nor wait the request timeout: the index creation gets
        `OPEN_TIMEOUT` seconds, then `open` logs a warning and the next `upsert` retries it first, so a daemon
        starts (and uploads) while MongoDB is down and catches up.
        A user without the right to create indexes (read-only) gets a warning, not an error.
        Bad credentials or a bad URI raise `PermanentCatalogError`.
        """
        if self._client is not None:
            return
        if (problem := uri_problem(self._uri)) is not None:  # PyMongo would only warn of an unknown option
            raise PermanentCatalogError(f"MongoDB catalog {self.url}: {problem}")
        timeout_ms = int(self.request_timeout * 1000)
        # Keyword arguments win over the URI's options in PyMongo: these two only where the URI has none.
        defaults = {"serverSelectionTimeoutMS": timeout_ms, "connectTimeoutMS": min(timeout_ms, 20_000)}
        self._warn_replaced_timeouts()
        try:
            self._client = AsyncMongoClient(
                self._uri,
                appname=self.appname,
                timeoutMS=timeout_ms,
                socketTimeoutMS=timeout_ms,
                **{name: value for name, value in defaults.items() if name.lower() not in self._uri_options},
            )
        except (PyMongoError, ValueError, TypeError) as exc:
            raise self._scrub(PermanentCatalogError(
                f"MongoDB catalog {self.url}: invalid client configuration: {type(exc).__name__}: {exc}")) from None
        self._files = self._client.get_database(self.database).get_collection(
            COLLECTION, write_concern=WriteConcern(w="majority", j=True))
        if not self._create_indexes:
            return
        try:
            with pymongo.timeout(min(self.request_timeout, OPEN_TIMEOUT)):  # the driver's own deadline, shortened
                await self._ensure_indexes()
        except TransientCatalogError as exc:
            log.warning("%s; will retry before the next catalog call", exc)
        except BaseException:
            await self.close()
            raise

    def _warn_replaced_timeouts(self) -> None:
        """Say once per process that the URI's timeoutMS/socketTimeoutMS are not used (they were ignored silently)."""
        replaced = tuple(spelt for name, spelt in _REPLACED_TIMEOUTS.items() if name in self._uri_options)
        if not replaced or (self.url, *replaced) in _warned_replaced:
            return
        _warned_replaced.add((self.url, *replaced))
        log.warning("MongoDB catalog %s: the URI's %s are not used: every catalog call is bounded by request_timeout "
                    "(MLDASH_REQUEST_TIMEOUT), %gs", self.url, ", ".join(replaced), self.request_timeout)

    async def close(self) -> None:
        client, self._client, self._files = self._client, None, None
        self._indexes_ready = False
        if client is not None:
            try:
                await self._deadline("close", lambda: self._close_client(client))
            except CatalogError as exc:
                log.warning("%s", exc)
        if self._abandoned:  # a closed client ends them: its server selection wakes up to InvalidOperation
            await asyncio.wait(list(self._abandoned), timeout=ABANDONED_CALLS_GRACE)
        if self._abandoned:
            # Still running: the client they belong to is closed, so cancelling them can no longer break a
            # client we use — and a task left pending would be destroyed with the event loop, with a warning.
            for task in list(self._abandoned):
                task.cancel()
            await asyncio.wait(list(self._abandoned), timeout=ABANDONED_CALLS_GRACE)

    @staticmethod
    async def _close_client(client: AsyncMongoClient[dict[str, Any]]) -> None:
        # close() first sends endSessions, with a server selection of its own that would wait the whole
        # timeoutMS for a server that is down: a daemon stopping during an outage would hang that long.
        # Ending sessions is best effort (the server expires them after 30 minutes), so give it little time.
        with pymongo.timeout(CLOSE_SESSIONS_TIMEOUT):
            await client.close()

    async def _ensure_indexes(self, what: str = "index creation") -> None:
        if self._indexes_ready:
            return
        experiment = [("namespace", ASCENDING), ("project", ASCENDING), ("experiment", ASCENDING)]
        indexes = [
            IndexModel([("id", ASCENDING)], name="id_unique", unique=True),
            IndexModel([*experiment, ("path", ASCENDING), ("createdAt", ASCENDING)], name="by_folder"),
            IndexModel([*experiment, ("createdAt", ASCENDING), ("id", ASCENDING)], name="by_time"),
            IndexModel([*experiment, ("tags", ASCENDING)], name="by_tag"),
        ]
        files = self._collection()
        try:
            await self._deadline(what, lambda: files.create_indexes(indexes))
        except PermanentCatalogError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, OperationFailure) and cause.code == 13):
                raise
            # Authenticated but not allowed to create indexes (a read-only user, or indexes managed by
            # an administrator): documents are still correct without them (_id is unique), only slower.
            log.warning("%s; continuing without creating indexes", exc)
        self._indexes_ready = True

    async def _deadline(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await `call()` under the outer deadline, mapping every failure through `catalog_error`.

        The driver call runs in a task of its own, shielded from our cancellation. On CPython < 3.12,
        `asyncio.wait_for` — which PyMongo wraps around its Condition waits (server selection, the pool) —
        can be cancelled while it is already cancelling its own timed-out wait; the inner wait then
        re-acquires the topology lock after wait_for has left, nobody ever releases it, the call fails with
        "RuntimeError: Lock is not acquired" and every later call, `close` included, hangs. A call we stop
        waiting for is therefore abandoned, not cancelled: it ends by its own timeoutMS or at `close`.
        """
        client = self._client
        selection = min(self.request_timeout, self.selection_timeout)

        async def bounded() -> T:
            # Writes need the primary; a reader goes by the URI's read preference (secondaryPreferred readers keep
            # reading while the primary is down or being elected).
            preference = ReadPreference.PRIMARY if client is None or self._create_indexes else client.read_preference
            if client is not None and not client.topology_description.has_readable_server(preference):
                # No such server known to be up (a new client, or MongoDB down): reach one first, within the
                # selection timeout — the operation's own server selection would wait the whole request timeout
                # (PyMongo's client-side timeout overrides serverSelectionTimeoutMS). One round trip, paid once.
                with pymongo.timeout(selection):
                    await client.get_database(self.database).command("ping", read_preference=preference)
            return await call()

        task = asyncio.ensure_future(bounded())
        try:
            async with asyncio.timeout(selection + self.request_timeout + DEADLINE_GRACE):
                return await asyncio.shield(task)
        except (PyMongoError, bson.errors.BSONError, OSError, TimeoutError) as exc:
            raise self._scrub(catalog_error(exc, what, self.url)) from exc
        finally:
            if not task.done():
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned_ended)

    def _abandoned_ended(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # retrieved: no "never retrieved"
            log.debug("%s: an abandoned call ended: %s: %s", self.url, type(exc).__name__, exc)

    def _scrub(self, error: CatalogError) -> CatalogError:
        """Belt and braces: drivers do not echo the password, but a message must never carry it."""
        text = str(error)
        scrubbed = scrub_secrets(text, self._secrets)
        return error if scrubbed == text else type(error)(scrubbed)

    async def _ready(self, what: str) -> AsyncCollection[dict[str, Any]]:
        """The collection, with its indexes created first (writes only: reads are correct without).

        `what` names the write: while MongoDB is down, it is the index creation before every commit that fails,
        and the log must say that a commit failed, not that indexing is the problem."""
        files = self._collection()
        await self._ensure_indexes(f"{what} (creating the catalog's indexes first)")
        return files

    def _collection(self) -> AsyncCollection[dict[str, Any]]:
        if self._files is None:
            raise RuntimeError(f"{self!r} is not open: call `await catalog.open()` first")
        return self._files

    # -- the contract ----------------------------------------------------------------------------

    async def _insert(self, docs: Sequence[FileDocument], what: str) -> set[str]:
        """One unordered insert of every document; the ids that were already there (duplicate key)."""
        files = await self._ready(what)
        bodies = [{"_id": doc.id, **doc.to_dict()} for doc in docs]

        async def write() -> set[str]:
            # A plain insert, not update+$setOnInsert: user metadata may hold "$"-prefixed keys, which
            # mongod accepts in inserted documents but refuses inside update operators. An id that is
            # already there (a replay, or a concurrent upsert that won) is what we asked for.
            # Unordered: one duplicate does not stop the documents after it.
            try:
                await files.insert_many(bodies, ordered=False)
            except BulkWriteError as exc:
                return _duplicates(exc, bodies, what, self.url)
            return set()

        return await self._deadline(what, write)

    async def get(self, file_id: str) -> dict[str, Any] | None:
        files = self._collection()
        doc = await self._deadline(f"get of {file_id}", lambda: files.find_one({"_id": file_id}, {"_id": 0}))
        return None if doc is None else _ordered(doc)

    async def get_many(self, file_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not file_ids:
            return {}
        files = self._collection()
        ids = list(dict.fromkeys(file_ids))

        async def read() -> dict[str, dict[str, Any]]:
            cursor = files.find({"_id": {"$in": ids}}, {"_id": 0})
            try:
                return {doc["id"]: _ordered(doc) async for doc in cursor}
            finally:
                await cursor.close()

        return await self._deadline(f"get of {len(ids)} documents", read)

    async def find(self, query: FileQuery) -> list[dict[str, Any]]:
        if query.limit is not None and query.limit < 0:
            raise ValueError(f"FileQuery.limit = {query.limit}; use None (no limit) or a count ≥ 0")
        if query.limit == 0:
            return []
        files = self._collection()
        selector: dict[str, Any] = {"namespace": query.namespace, "project": query.project,
                                    "experiment": query.experiment}
        if query.path is not None:
            selector["path"] = folder(query.path)
        if query.tags:
            selector["tags"] = {"$all": list(query.tags)}
        glob = Glob.parse(query.filename_glob) if query.filename_glob is not None else None
        if glob is not None and glob.exact:
            selector["filename"] = {"$regex": glob.regex}
        server_limit = query.limit if glob is None or glob.exact else None

        async def read() -> list[dict[str, Any]]:
            cursor = files.find(selector, {"_id": 0}, sort=[("createdAt", ASCENDING), ("id", ASCENDING)],
                                limit=server_limit or 0)
            out: list[dict[str, Any]] = []
            try:
                # Streamed: an inexact glob filters batch by batch instead of loading the experiment.
                async for doc in cursor:
                    if glob is not None and not glob.matches(doc["filename"]):
                        continue
                    out.append(_ordered(doc))
                    if query.limit is not None and len(out) >= query.limit:
                        break
            finally:
                await cursor.close()
            return out

        return await self._deadline("find", read)

    async def ping(self) -> None:
        self._collection()
        assert self._client is not None
        client = self._client
        await self._deadline("ping", lambda: client.get_database(self.database).command("ping"))
