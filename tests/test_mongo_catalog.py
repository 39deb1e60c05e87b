"""MongoCatalog under faults: unreachable servers, failpoints, a server stopped and restarted.

Deadline assertions are generous bounds ("it gave up instead of hanging"), not performance checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pymongo
import pytest

from mldash.catalog import FileDocument, FileQuery, MongoCatalog, PermanentCatalogError, TransientCatalogError
from mldash.catalog.mongo import catalog_error
from tests.fixtures.mongo import MongoServerProcess, free_port, release_driver_sockets

REQUEST_TIMEOUT = 1.0
GIVE_UP_WITHIN = 10.0  # seconds: request_timeout + grace, with a wide margin for a loaded 2-core machine


@pytest.fixture(autouse=True)
def _release_driver_sockets() -> Iterator[None]:
    yield
    release_driver_sockets()


def make_doc(file_id: str = "7000000000000000001", **changes: object) -> FileDocument:
    doc = FileDocument(
        id=file_id, namespace="ns", project="p", experiment="e", path="/", filename="a.pt", sizeBytes=3,
        checksum="00" * 32, contentType="application/octet-stream", storageKey=f"files/ns/p/e/{file_id}/a.pt",
        storageUri=f"file:///store/files/ns/p/e/{file_id}/a.pt", createdAt=1.0, committedAt=2.0)
    return replace(doc, **changes)


@contextlib.asynccontextmanager
async def blackhole_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def assert_gives_up_transient(catalog: MongoCatalog) -> None:
    for call in (lambda: catalog.upsert(make_doc()), lambda: catalog.get("1"),
                 lambda: catalog.find(FileQuery("ns", "p", "e")), catalog.ping):
        started = time.monotonic()
        with pytest.raises(TransientCatalogError):
            await call()
        assert time.monotonic() - started < GIVE_UP_WITHIN


async def test_closed_port_is_transient_within_deadline() -> None:
    port = free_port()  # nothing listens there: connection refused
    catalog = MongoCatalog(f"mongodb://127.0.0.1:{port}/", database="x", request_timeout=REQUEST_TIMEOUT)
    started = time.monotonic()
    await catalog.open()  # does not fail: a daemon may start while MongoDB is down
    try:
        assert time.monotonic() - started < GIVE_UP_WITHIN
        await assert_gives_up_transient(catalog)
    finally:
        await catalog.close()


async def test_open_does_not_wait_the_request_timeout_for_a_server_that_is_down() -> None:
    """A daemon starting while MongoDB is down must start uploading: `open` gives the index creation
    OPEN_TIMEOUT (3 s), not the request timeout (60 s by default), then defers it to the first write."""
    from mldash.catalog.mongo import OPEN_TIMEOUT

    catalog = MongoCatalog(f"mongodb://127.0.0.1:{free_port()}/", database="x", request_timeout=60.0)
    started = time.monotonic()
    await catalog.open()
    try:
        assert time.monotonic() - started < OPEN_TIMEOUT + GIVE_UP_WITHIN < 60.0
        assert not catalog._indexes_ready  # retried before the first write
    finally:
        await catalog.close()


async def test_a_commit_to_a_server_down_since_start_is_reported_as_the_commit_that_failed() -> None:
    """With MongoDB down since the daemon started, every commit first creates the indexes `open` could not, so that
    is the call that fails; the message used to say "index creation failed", as if indexing were the problem."""
    catalog = MongoCatalog(f"mongodb://127.0.0.1:{free_port()}/", database="x", request_timeout=REQUEST_TIMEOUT)
    await catalog.open()
    try:
        doc = make_doc()
        with pytest.raises(TransientCatalogError) as raised:
            await catalog.upsert(doc)
        assert f"upsert of {doc.id} (creating the catalog's indexes first) failed" in str(raised.value)
    finally:
        await catalog.close()


async def test_a_server_that_is_down_is_reported_after_the_selection_timeout_not_the_request_timeout() -> None:
    """With the default 60 s request timeout a commit to a MongoDB that refuses connections used to fail (and
    the daemon say so, in its log and `status`) only after a minute; it now takes SERVER_SELECTION_TIMEOUT."""
    from mldash.catalog.mongo import SERVER_SELECTION_TIMEOUT

    catalog = MongoCatalog(f"mongodb://127.0.0.1:{free_port()}/", database="x", request_timeout=60.0)
    await catalog.open()
    try:
        started = time.monotonic()
        with pytest.raises(TransientCatalogError):
            await catalog.get("1")
        assert time.monotonic() - started < SERVER_SELECTION_TIMEOUT + GIVE_UP_WITHIN < 60.0
    finally:
        await catalog.close()


def with_option(uri: str, option: str) -> str:
    """`uri` with one more query option."""
    return f"{uri}&{option}" if "?" in uri else f"{uri.rstrip('/')}/?{option}"


async def test_a_server_selection_timeout_in_the_uri_is_honoured_while_the_server_is_down() -> None:
    """serverSelectionTimeoutMS=500 in the URI was overridden: `open` gave up after OPEN_TIMEOUT (3 s), every later
    call after SERVER_SELECTION_TIMEOUT (15 s)."""
    uri = with_option(f"mongodb://127.0.0.1:{free_port()}/", "serverSelectionTimeoutMS=500")
    catalog = MongoCatalog(uri, database="x", request_timeout=60.0)
    started = time.monotonic()
    await catalog.open()
    try:
        opened = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(TransientCatalogError):
            await catalog.get("1")
        failed = time.monotonic() - started
    finally:
        await catalog.close()
    assert opened < 2.5 and failed < 5.0, (opened, failed)


async def test_a_server_selection_timeout_in_the_uri_reaches_the_driver(mongo_uri: str, mongo_db_name: str) -> None:
    """A value above mldash's own (15 s) is the user's too: the driver and mldash's wait for a server both use it."""
    from mldash.catalog.mongo import SERVER_SELECTION_TIMEOUT

    uri = with_option(mongo_uri, "serverSelectionTimeoutMS=30000&connectTimeoutMS=1500")
    async with MongoCatalog(uri, database=mongo_db_name, request_timeout=60.0) as catalog:
        assert catalog.selection_timeout == 30.0
        assert catalog._client is not None and catalog._client.options.server_selection_timeout == 30.0
        assert catalog._client.options.pool_options.connect_timeout == 1.5  # the URI's, not min(60 s, 20 s)
        await catalog.upsert(make_doc())
        assert await catalog.get(make_doc().id) == make_doc().to_dict()
    assert MongoCatalog(mongo_uri, database="x").selection_timeout == SERVER_SELECTION_TIMEOUT  # none given
    # A caller's shorter wait (a training job's reads: reader.CATALOG_READ_TIMEOUT) still bounds it.
    assert MongoCatalog(uri, database="x", selection_timeout=5.0).selection_timeout == 5.0


async def test_uri_timeouts_that_request_timeout_replaces_are_named(mongo_uri: str, mongo_db_name: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """timeoutMS and socketTimeoutMS in the URI give way to request_timeout, and say so instead of in silence."""
    uri = with_option(mongo_uri, "timeoutMS=5000&socketTimeoutMS=4000")
    with caplog.at_level("WARNING", logger="mldash.catalog.mongo"):
        async with MongoCatalog(uri, database=mongo_db_name, request_timeout=7.0) as catalog:
            assert catalog._client is not None and catalog._client.options.timeout == 7.0
        async with MongoCatalog(uri, database=mongo_db_name, request_timeout=7.0):
            pass
    warnings = [r.getMessage() for r in caplog.records if "timeoutMS" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per process, not once per catalog (the client opens one per read)
    assert ("the URI's timeoutMS, socketTimeoutMS are not used: every catalog call is bounded by request_timeout "
            "(MLDASH_REQUEST_TIMEOUT), 7s" in warnings[0]), warnings


@pytest.mark.parametrize(("uri", "named"), [
    ("mongodb://u:sekret@h:1/?retryWrite=true", "unknown option 'retryWrite'; did you mean 'retrywrites'?"),
    ("mongodb+srv://cluster0.example.net/?authSource=admin&bogusOption=1", "unknown option 'bogusOption'"),
    ("mongodb://h:1/?authMechanism=BOGUS", "authmechanism must be in"),
    ("mongodb://h:1/?tls=maybe", "tls must be 'true' or 'false'"),
    ("mongodb://u:p@ss@h:1/", "must be escaped according to RFC 3986"),
    ("mongodb://h:99999/", "Port must be an integer"),
])
async def test_a_uri_pymongo_would_refuse_or_ignore_is_refused_at_open_naming_the_option(uri: str, named: str) -> None:
    """PyMongo only warns of an unknown option (a typo then silently changes nothing) and names neither an unknown
    option nor, for a bad value, the value: the catalog refuses the URI at open, naming the option, never the
    password — and without connecting or resolving anything."""
    from mldash.catalog.mongo import uri_problem

    assert named in (uri_problem(uri) or "")
    catalog = MongoCatalog(uri, database="x", request_timeout=REQUEST_TIMEOUT)
    with pytest.raises(PermanentCatalogError, match=re.escape(named)) as raised:
        await catalog.open()
    assert "sekret" not in str(raised.value)


@pytest.mark.parametrize("uri", ["mongodb://u:p@h:1/db?authSource=admin&replicaSet=rs0&w=majority&ssl=true",
                                 "mongodb+srv://c.example.net/?srvMaxHosts=2&readPreference=secondaryPreferred",
                                 "mongodb://h1:1,h2:2/?directConnection=false&serverSelectionTimeoutMS=500"])
def test_uris_pymongo_accepts_pass_the_check(uri: str) -> None:
    from mldash.catalog.mongo import uri_problem

    assert uri_problem(uri) is None


async def test_blackhole_server_is_transient_within_deadline() -> None:
    async with blackhole_server() as port:
        catalog = MongoCatalog(f"mongodb://127.0.0.1:{port}/", database="x", request_timeout=REQUEST_TIMEOUT)
        started = time.monotonic()
        await catalog.open()
        try:
            assert time.monotonic() - started < GIVE_UP_WITHIN
            await assert_gives_up_transient(catalog)
        finally:
            await catalog.close()


@pytest.fixture
async def catalog(mongo_uri: str, mongo_db_name: str) -> AsyncIterator[MongoCatalog]:
    async with MongoCatalog(mongo_uri, database=mongo_db_name, request_timeout=REQUEST_TIMEOUT,
                            appname="mldash-failpoint-test") as cat:
        yield cat


@contextlib.contextmanager
def fail_command(admin: pymongo.MongoClient, data: dict[str, object], mode: object = "alwaysOn"):
    """A failCommand failpoint scoped to the catalog's client (its appName), switched off afterwards."""
    admin.admin.command("configureFailPoint", "failCommand", mode=mode,
                        data={"appName": "mldash-failpoint-test", **data})
    try:
        yield
    finally:
        admin.admin.command("configureFailPoint", "failCommand", mode="off")


@pytest.mark.parametrize("failure", [
    {"closeConnection": True},    # the connection drops mid-request
    {"errorCode": 6},             # HostUnreachable
    {"errorCode": 89},            # NetworkTimeout
    {"errorCode": 262},           # ExceededTimeLimit
], ids=["close-connection", "host-unreachable", "network-timeout", "exceeded-time-limit"])
async def test_failing_writes_are_transient_then_retry_succeeds(
        catalog: MongoCatalog, mongo_admin: pymongo.MongoClient, mongo_db_name: str, failure: dict) -> None:
    doc = make_doc()
    # alwaysOn: the driver's own retries (retryable writes, within timeoutMS) fail too.
    with fail_command(mongo_admin, {"failCommands": ["insert"], **failure}):
        started = time.monotonic()
        with pytest.raises(TransientCatalogError):
            await catalog.upsert(doc)
        assert time.monotonic() - started < GIVE_UP_WITHIN
    await catalog.upsert(doc)  # the daemon's retry, same catalog object
    await catalog.upsert(replace(doc, committedAt=99.0))  # and a replay
    assert mongo_admin[mongo_db_name].files.count_documents({}) == 1
    assert await catalog.get(doc.id) == doc.to_dict()


@pytest.mark.parametrize("failure", [
    {"closeConnection": True},
    {"errorCode": 6},             # HostUnreachable
    {"writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"}},  # WriteConcernFailed
], ids=["close-connection", "host-unreachable", "write-concern-failed"])
async def test_failing_batch_is_transient_then_retry_succeeds(
        catalog: MongoCatalog, mongo_admin: pymongo.MongoClient, mongo_db_name: str, failure: dict) -> None:
    docs = [make_doc(str(7000000000000000100 + i)) for i in range(4)]
    with fail_command(mongo_admin, {"failCommands": ["insert"], **failure}):
        started = time.monotonic()
        with pytest.raises(TransientCatalogError):
            await catalog.upsert_many(docs)
        assert time.monotonic() - started < GIVE_UP_WITHIN
    # The daemon's retry of the same batch: whatever the failed call stored comes back as present.
    present = await catalog.upsert_many(docs)
    assert present <= {d.id for d in docs}
    assert mongo_admin[mongo_db_name].files.count_documents({}) == len(docs)
    assert await catalog.get_many([d.id for d in docs]) == {d.id: d.to_dict() for d in docs}


async def test_batch_auth_failure_is_permanent(catalog: MongoCatalog, mongo_admin: pymongo.MongoClient) -> None:
    unauthorized = {"failCommands": ["insert"], "errorCode": 13}
    with fail_command(mongo_admin, unauthorized), pytest.raises(PermanentCatalogError):
        await catalog.upsert_many([make_doc(), make_doc("7000000000000000002")])


async def test_batch_with_a_network_error_replayed_by_the_driver(
        catalog: MongoCatalog, mongo_admin: pymongo.MongoClient, mongo_db_name: str) -> None:
    docs = [make_doc(str(7000000000000000200 + i)) for i in range(3)]
    with fail_command(mongo_admin, {"failCommands": ["insert"], "closeConnection": True}, mode={"times": 1}):
        present = await catalog.upsert_many(docs)
    assert present <= {d.id for d in docs}  # a retried batch may find its own first try's documents
    assert mongo_admin[mongo_db_name].files.count_documents({}) == len(docs)


async def test_single_network_error_is_absorbed_by_retryable_writes(
        catalog: MongoCatalog, mongo_admin: pymongo.MongoClient, mongo_db_name: str) -> None:
    doc = make_doc()
    with fail_command(mongo_admin, {"failCommands": ["insert"], "closeConnection": True}, mode={"times": 1}):
        await catalog.upsert(doc)
    assert mongo_admin[mongo_db_name].files.count_documents({}) == 1


async def test_auth_failure_is_permanent(catalog: MongoCatalog, mongo_admin: pymongo.MongoClient) -> None:
    with fail_command(mongo_admin, {"failCommands": ["find", "insert"], "errorCode": 13}):  # Unauthorized
        with pytest.raises(PermanentCatalogError):
            await catalog.upsert(make_doc())
        with pytest.raises(PermanentCatalogError):
            await catalog.get("1")


async def test_failing_reads_are_transient(catalog: MongoCatalog, mongo_admin: pymongo.MongoClient) -> None:
    await catalog.upsert(make_doc())
    with fail_command(mongo_admin, {"failCommands": ["find"], "errorCode": 6}):
        with pytest.raises(TransientCatalogError):
            await catalog.find(FileQuery("ns", "p", "e"))
        with pytest.raises(TransientCatalogError):
            await catalog.get("1")
    assert len(await catalog.find(FileQuery("ns", "p", "e"))) == 1


async def test_server_stopped_then_back(mongo_server_process: Callable[..., MongoServerProcess]) -> None:
    server = mongo_server_process()
    first, second = make_doc("7000000000000000001"), make_doc("7000000000000000002")
    async with MongoCatalog(server.uri, database="mldash", request_timeout=REQUEST_TIMEOUT) as catalog:
        await catalog.upsert(first)
        await asyncio.to_thread(server.stop)
        started = time.monotonic()
        with pytest.raises(TransientCatalogError):
            await catalog.upsert(second)
        assert time.monotonic() - started < GIVE_UP_WITHIN
        await asyncio.to_thread(server.start)  # same port, same data
        # The driver rediscovers the server on its own; the daemon's retry loop is modelled here.
        for _ in range(20):
            try:
                await catalog.upsert(second)
                break
            except TransientCatalogError:
                await asyncio.sleep(0.5)
        else:
            pytest.fail("the catalog never recovered after the server came back")
        found = await catalog.find(FileQuery("ns", "p", "e"))
        assert [d["id"] for d in found] == [first.id, second.id]


async def test_a_call_whose_caller_is_cancelled_is_abandoned_not_cancelled_inside_the_driver(
        mongo_server_process: Callable[..., MongoServerProcess]) -> None:
    """Cancelling PyMongo's Condition waits can leave its topology lock held forever on CPython < 3.12 (a
    daemon stopping mid-commit then hung in close and leaked the client). The catalog never cancels a driver
    call: the caller gets its CancelledError at once, the call itself ends by the client's close — which,
    with the server down, must not wait out the timeout either (endSessions gets its own short one)."""
    server = mongo_server_process()
    catalog = MongoCatalog(server.uri, database="mldash", request_timeout=60.0)
    await catalog.open()
    try:
        await catalog.upsert(make_doc("7000000000000000001"))
        await asyncio.to_thread(server.stop)
        caller = asyncio.create_task(catalog.upsert(make_doc("7000000000000000002")))
        await asyncio.sleep(0.5)  # the driver waits for a server (up to 60 s)
        assert not caller.done()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert len(catalog._abandoned) == 1, "the driver call must outlive its cancelled caller"
        (driver_call,) = catalog._abandoned
        assert not driver_call.done()
    finally:
        started = time.monotonic()
        await catalog.close()
    assert time.monotonic() - started < GIVE_UP_WITHIN, "close must not wait for the abandoned call's timeout"
    assert driver_call.done() and not driver_call.cancelled()
    assert isinstance(driver_call.exception(), pymongo.errors.PyMongoError)


async def test_close_ends_an_abandoned_call_that_outlives_the_closed_client() -> None:
    """A driver call that neither its timeout nor the closed client ends (none is known; this is the guard):
    `close` cancels it after its grace, so no task is left pending when the event loop closes."""
    catalog = MongoCatalog("mongodb://127.0.0.1:9/?directConnection=true", database="mldash", request_timeout=0.1)
    stubborn = asyncio.Event()
    with pytest.raises(TransientCatalogError):
        await catalog._deadline("a stubborn call", stubborn.wait)  # outer deadline 0.1 s + grace: abandoned
    (call,) = catalog._abandoned
    await catalog.close()
    assert call.cancelled() and not catalog._abandoned


async def test_server_killed_keeps_acknowledged_writes(
        mongo_server_process: Callable[..., MongoServerProcess]) -> None:
    server = mongo_server_process()
    docs = [make_doc(str(7_000_000_000_000_000_000 + i), createdAt=float(i)) for i in range(5)]
    async with MongoCatalog(server.uri, database="mldash", request_timeout=REQUEST_TIMEOUT) as catalog:
        for doc in docs:
            await catalog.upsert(doc)
    await asyncio.to_thread(server.kill)  # SIGKILL right after the acknowledgements
    await asyncio.to_thread(server.start)
    async with MongoCatalog(server.uri, database="mldash", request_timeout=5.0) as catalog:
        assert [d["id"] for d in await catalog.find(FileQuery("ns", "p", "e"))] == [d.id for d in docs]


def test_error_mapping() -> None:
    from pymongo.errors import (
        AutoReconnect,
        ConfigurationError,
        DuplicateKeyError,
        NetworkTimeout,
        NotPrimaryError,
        OperationFailure,
        ServerSelectionTimeoutError,
        WriteConcernError,
    )

    def kind(exc: BaseException) -> str:
        return "transient" if catalog_error(exc, "op", "mongodb://h/").transient else "permanent"

    assert kind(ServerSelectionTimeoutError("x")) == "transient"
    assert kind(AutoReconnect("x")) == "transient"
    assert kind(NetworkTimeout("x")) == "transient"
    assert kind(NotPrimaryError("x", {})) == "transient"
    assert kind(TimeoutError()) == "transient"
    assert kind(ConnectionResetError()) == "transient"
    assert kind(OperationFailure("x", code=91)) == "transient"
    assert kind(WriteConcernError("x", code=64, details={})) == "transient"
    assert kind(WriteConcernError("x", code=100, details={"errorLabels": ["RetryableWriteError"]})) == "transient"
    assert kind(OperationFailure("auth", code=18)) == "permanent"
    assert kind(OperationFailure("auth", code=13)) == "permanent"
    assert kind(OperationFailure("bad", code=2)) == "permanent"
    assert kind(DuplicateKeyError("dup", code=11000)) == "permanent"
    assert kind(ConfigurationError("x")) == "permanent"


async def test_writes_are_journaled_majority(catalog: MongoCatalog) -> None:
    assert catalog._files is not None
    assert catalog._files.write_concern.document == {"w": "majority", "j": True}


async def test_indexes(catalog: MongoCatalog, mongo_admin: pymongo.MongoClient, mongo_db_name: str) -> None:
    indexes = mongo_admin[mongo_db_name].files.index_information()
    assert indexes["id_unique"]["unique"] is True
    assert {"by_folder", "by_time", "by_tag"} <= set(indexes)


async def test_index_creation_deferred_while_down(
        mongo_uri: str, mongo_db_name: str, mongo_admin: pymongo.MongoClient) -> None:
    with fail_command(mongo_admin, {"failCommands": ["createIndexes"], "errorCode": 6}):
        catalog = MongoCatalog(mongo_uri, database=mongo_db_name, request_timeout=REQUEST_TIMEOUT,
                               appname="mldash-failpoint-test")
        await catalog.open()  # a warning, not an error: the daemon may start while MongoDB is unwell
    try:
        assert "id_unique" not in mongo_admin[mongo_db_name].files.index_information()
        await catalog.upsert(make_doc())  # creates the indexes first
        assert "id_unique" in mongo_admin[mongo_db_name].files.index_information()
    finally:
        await catalog.close()


async def test_index_creation_denied_is_not_fatal(
        mongo_uri: str, mongo_db_name: str, mongo_admin: pymongo.MongoClient) -> None:
    # A read-only user (or indexes managed by an administrator): Unauthorized on createIndexes only.
    with fail_command(mongo_admin, {"failCommands": ["createIndexes"], "errorCode": 13}):
        async with MongoCatalog(mongo_uri, database=mongo_db_name, request_timeout=REQUEST_TIMEOUT,
                                appname="mldash-failpoint-test") as catalog:
            assert await catalog.find(FileQuery("ns", "p", "e")) == []
            await catalog.upsert(make_doc())
    assert mongo_admin[mongo_db_name].files.count_documents({}) == 1
