"""How the daemon meets failing dependencies: permanent errors, a dead catalog, a blackholed store."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from mldash.catalog.sqlite import SqliteCatalog
from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout, State
from tests.backend_helpers import catalog_docs, read_object
from tests.faults.wrapped import Wrapped
from tests.fixtures.daemon import enqueue_bytes
from tests.test_daemon_process import cli

MIB = 2**20


def rows(settings: Settings) -> dict[int, dict]:
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        return {row["id"]: row for row in index.rows()}
    finally:
        index.close()


def fast(settings: Settings, **changes) -> Settings:
    return settings.replace(retry_base_delay=0.05, retry_max_delay=0.3, request_timeout=1.0, **changes)


def test_missing_bucket_fails_after_one_attempt_then_retry_works(s3_settings: Settings, drain) -> None:
    bucket = f"not-yet-{os.getpid()}-{time.monotonic_ns()}"
    settings = fast(s3_settings, store=f"s3://{bucket}/root")
    entries = [enqueue_bytes(settings, os.urandom(100), filename=f"f{i}") for i in range(3)]

    report = drain(settings, max_wait=20)

    assert report.failed == 3 and not report.clean
    for entry in entries:
        row = rows(settings)[entry.id]
        assert row["state"] == State.FAILED
        assert row["attempts"] == 1, "a permanent error must not be retried"
        assert "NoSuchBucket" in row["last_error"]

    boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    index = SpoolIndex(SpoolLayout(settings.spool))
    assert sorted(index.retry()) == sorted(e.id for e in entries)
    index.close()
    assert drain(settings).committed == 3
    assert all(read_object(settings, e.key()) is not None for e in entries)


def test_entries_waiting_for_an_outage_go_as_soon_as_the_store_answers(settings: Settings, caplog) -> None:
    """An entry that met a store outage waits out a backoff drawn while the store was down (here 10 minutes,
    as if set just before). The next upload that succeeds ends the outage: the waiting entry goes at once."""
    from mldash_syncd import Daemon

    layout = SpoolLayout(settings.spool)
    waiting = enqueue_bytes(settings, b"met the outage", filename="waiting.bin")
    index = SpoolIndex(layout.ensure())
    try:
        from mldash.spool.recovery import recover

        recover(index, layout, "test", ingest=True)
        index.transition(waiting.id, State.QUEUED, next_attempt_at=time.time() + 600, error_kind="outage",
                         last_error="upload: TransientStoreError: connection refused")
    finally:
        index.close()
    fresh = enqueue_bytes(settings, b"saved after it", filename="fresh.bin")
    daemon = Daemon(settings)
    daemon.store_gate.failure("connection refused")  # the outage this daemon saw
    daemon.store_gate.open_until = 0.0  # and its probe is due: the fresh entry is that probe
    with caplog.at_level(logging.INFO, logger="mldash_syncd"):
        report = asyncio.run(daemon.run(until_drained=True, max_wait=30))
    assert report.committed == 2, report
    assert {d["id"] for d in catalog_docs(settings)} == {str(waiting.id), str(fresh.id)}
    assert "store reachable again: 1 entries waiting for it go now" in caplog.text


def test_an_outage_is_probed_at_least_every_15_seconds(settings: Settings) -> None:
    from mldash_syncd import Daemon
    from mldash_syncd.retry import OUTAGE_PROBE_MAX

    daemon = Daemon(settings.replace(retry_max_delay=300))
    assert OUTAGE_PROBE_MAX == 15.0
    assert max(daemon.store_gate.failure("down") for _ in range(40)) <= OUTAGE_PROBE_MAX
    assert max(daemon.catalog_gate.failure("down") for _ in range(40)) <= OUTAGE_PROBE_MAX
    assert daemon.store_gate.success() is True and daemon.store_gate.success() is False


def test_catalog_down_uploads_continue_and_commit_later_exactly_once(settings: Settings, mongo_server_process,
                                                                     drain, caplog: pytest.LogCaptureFixture) -> None:
    server = mongo_server_process()
    live = fast(settings, catalog=server.uri, mongo_database="mldash_down")
    server.stop()
    entries = [enqueue_bytes(live, os.urandom(2000), filename=f"f{i}") for i in range(4)]

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mldash_syncd"):
        report = drain(live, max_wait=4)
    assert time.monotonic() - started < 60, "a dead catalog must not hang the daemon"
    outage_lines = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert outage_lines, "the outage must be visible in the log"
    assert all(line.startswith("commit of ") for line in outage_lines), (
        f"one line per failed batch, not one per entry: {outage_lines}")

    assert report.committed == 0
    for entry in entries:
        row = rows(live)[entry.id]
        assert row["state"] == State.UPLOADED, "bytes go up while the catalog is down"
        assert row["attempts"] == 0, "an outage must not burn attempts"
        assert read_object(live, entry.key()) is not None

    server.start()
    assert drain(live).committed == 4
    docs = catalog_docs(live)
    assert sorted(d["id"] for d in docs) == sorted(str(e.id) for e in entries)


def test_uploads_start_while_the_catalog_is_still_opening(settings: Settings, drain,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the MongoDB catalog (index creation) waits up to OPEN_TIMEOUT for a server that is down; uploads
    need no catalog and do not wait for it. Here opening would take ~15 s (the server selection timeout): the
    run's 4 s of max wait see every entry uploaded, none committed, no attempt spent."""
    from mldash.catalog import mongo
    from tests.fixtures.mongo import free_port

    monkeypatch.setattr(mongo, "OPEN_TIMEOUT", 120.0)
    down = fast(settings, catalog=f"mongodb://127.0.0.1:{free_port()}/mldash").replace(request_timeout=120.0)
    entries = [enqueue_bytes(down, os.urandom(500), filename=f"f{i}") for i in range(3)]

    started = time.monotonic()
    report = drain(down, max_wait=4)
    assert time.monotonic() - started < 12, "the end of the run must not wait for the catalog to open"
    assert report.committed == 0
    for entry in entries:
        row = rows(down)[entry.id]
        assert (row["state"], row["attempts"]) == (State.UPLOADED, 0)
        assert read_object(down, entry.key()) is not None

    assert drain(settings.replace(store=down.store)).committed == 3  # the SQLite catalog: committed once there


def test_a_catalog_that_cannot_be_opened_stops_the_daemon_without_losing_uploads(settings: Settings,
                                                                                  drain) -> None:
    """A configuration the catalog refuses at open (here a URI PyMongo rejects) ends the run with that error (the
    CLI exits 2, so systemd does not restart into it) — after the uploads already in flight; nothing is failed
    or lost, and the next run with a usable catalog commits everything once."""
    from mldash.catalog.base import PermanentCatalogError

    bad = fast(settings, catalog="mongodb://user:hunter2@127.0.0.1:1/mldash?authSource=")
    entries = [enqueue_bytes(bad, os.urandom(500), filename=f"f{i}") for i in range(3)]

    with pytest.raises(PermanentCatalogError) as caught:
        drain(bad, max_wait=30)
    assert "authSource" in str(caught.value) and "hunter2" not in str(caught.value)
    for entry in entries:
        row = rows(bad)[entry.id]
        assert row["state"] in (State.QUEUED, State.UPLOADED) and row["attempts"] == 0, row
    assert drain(settings.replace(store=bad.store)).committed == 3
    assert sorted(d["id"] for d in catalog_docs(settings)) == sorted(str(e.id) for e in entries)


class SlowOpeningCatalog(SqliteCatalog):
    """The real SQLite catalog, whose opening first takes `delay` seconds (as MongoDB's does while the server is
    down, up to OPEN_TIMEOUT). Only the wait is added: writes and reads are the catalog's own."""

    def __init__(self, settings: Settings, delay: float) -> None:
        super().__init__(settings.catalog.removeprefix("sqlite://"), request_timeout=settings.request_timeout)
        self.delay = delay

    async def open(self) -> None:
        await asyncio.sleep(self.delay)
        await super().open()


def test_entries_waiting_for_the_catalog_to_open_do_not_spin_the_loop(settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries left `uploaded` by a run that ended during a catalog outage, and a restart whose catalog takes 2 s
    to open: the loop waits for the opening (its end wakes the loop) instead of asking the index every 10 ms."""
    from mldash_syncd.service import Daemon

    live = fast(settings)
    entries = [enqueue_bytes(live, os.urandom(500), filename=f"f{i}") for i in range(3)]
    asyncio.run(Daemon(live, catalog=SlowOpeningCatalog(live, 60.0)).run(until_drained=True, max_wait=1.5))
    assert {row["state"] for row in rows(live).values()} == {State.UPLOADED}

    passes = 0
    next_due = SpoolIndex.next_due

    def counted(self: SpoolIndex, *args: object, **kwargs: object) -> object:
        nonlocal passes
        passes += 1
        return next_due(self, *args, **kwargs)

    monkeypatch.setattr(SpoolIndex, "next_due", counted)
    report = asyncio.run(Daemon(live, catalog=SlowOpeningCatalog(live, 2.0)).run(until_drained=True, max_wait=30))
    assert report.committed == 3
    assert passes < 20, f"{passes} loop passes while the catalog opened for 2 s: the loop polled"
    assert sorted(d["id"] for d in catalog_docs(live)) == sorted(str(e.id) for e in entries)


def test_cancelling_run_does_not_wait_for_the_catalog_to_open(settings: Settings) -> None:
    """An embedding program cancels `Daemon.run()` while the catalog is still opening: run ends promptly (the
    opening is cancelled), the entry stays in the spool unharmed, and the lock is released for the next run."""
    from mldash_syncd.service import Daemon

    live = fast(settings)
    entry = enqueue_bytes(live, os.urandom(500), filename="f0")

    async def cancel_after(seconds: float) -> float:
        task = asyncio.create_task(Daemon(live, catalog=SlowOpeningCatalog(live, 30.0)).run())
        await asyncio.sleep(seconds)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - cancelled_at

    took = asyncio.run(cancel_after(1.0))
    assert took < 5, f"run() took {took:.1f} s to end after it was cancelled"
    assert rows(live)[entry.id]["attempts"] == 0
    report = asyncio.run(Daemon(live).run(until_drained=True, max_wait=30))
    assert report.committed == 1


def test_a_sqlite_catalog_whose_opening_is_cancelled_closes_its_connection(settings: Settings, tmp_path) -> None:
    """The catalog file is locked by another writer, so opening waits; the run's max wait cancels it. When the
    other writer lets go, the abandoned opening completes in its thread — and its connection must be closed,
    not left to a catalog object the daemon has already closed."""
    import sqlite3

    from mldash_syncd.service import Daemon

    live = fast(settings).replace(request_timeout=3.0)
    enqueue_bytes(live, os.urandom(500), filename="f0")
    path = tmp_path / "locked-catalog.sqlite"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    catalog = SqliteCatalog(path, request_timeout=3.0)
    try:
        report = asyncio.run(Daemon(live, catalog=catalog).run(until_drained=True, max_wait=0.5))
    finally:
        blocker.rollback()
        blocker.close()
    assert report.remaining == {"uploaded": 1}
    for worker in [t for t in threading.enumerate() if t.name.startswith("mldash-catalog-sqlite")]:
        worker.join(timeout=10)  # the abandoned opening, then the close queued behind it
    held = [fd for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(path))]
    assert catalog._conn is None and not held, "the abandoned opening left its connection open"


def test_stop_request_ends_the_wait_for_a_catalog_still_opening(settings: Settings) -> None:
    """`run --once` on a spool with nothing to commit ends its loop at once, then waits for the catalog's opening
    (so that a catalog it cannot use is reported). A SIGTERM (request_stop) during that wait must end it: it is
    ignored until the opening ends (MongoDB: OPEN_TIMEOUT; a locked SQLite file: 0.8 × request_timeout)."""
    from mldash_syncd.service import Daemon

    live = fast(settings)
    SpoolLayout(live.spool).ensure()

    async def stop_after(seconds: float) -> float:
        daemon = Daemon(live, catalog=SlowOpeningCatalog(live, 30.0))
        task = asyncio.create_task(daemon.run(until_drained=True))
        await asyncio.sleep(seconds)
        stopped_at = time.monotonic()
        daemon.request_stop()  # what the CLI's SIGTERM handler calls
        await asyncio.wait_for(task, timeout=60)
        return time.monotonic() - stopped_at

    took = asyncio.run(stop_after(0.5))
    assert took < 5, f"run() took {took:.1f} s to end after a stop request"


def test_run_once_max_wait_exits_promptly_when_the_sqlite_catalog_is_locked(settings: Settings,
                                                                            tmp_path: Path) -> None:
    """`run --once --max-wait 1` while another process holds the SQLite catalog file locked: run() ends at the
    max wait (the opening is cancelled), but the abandoned opening's thread sits in SQLite's busy wait
    (0.8 × request_timeout, uninterruptible) and the interpreter joins it at exit: the process outlives its
    max wait by ~16 s here (request_timeout 20; 48 s with the default 60)."""
    import sqlite3

    live = settings.replace(request_timeout=20.0)
    enqueue_bytes(live, os.urandom(500), filename="f0")
    catalog_path = Path(live.catalog.removeprefix("sqlite://"))
    blocker = sqlite3.connect(catalog_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = cli(live, "run", "--once", "--max-wait", "1", "--quiet")
        took = time.monotonic() - started
    finally:
        blocker.rollback()
        blocker.close()
    assert result.returncode == 1, result.stderr  # work left: the entry waits in `uploaded`
    assert took < 8, f"run --once --max-wait 1 took {took:.1f} s to exit"


def test_a_sqlite_catalog_reopened_after_a_cancelled_opening_keeps_its_connection(tmp_path: Path) -> None:
    """open() resets the catalog after a failed or cancelled opening, so opening it again is allowed. The
    abandoned opening finishes later on its old thread: it stores its connection in `_conn` and the close queued
    behind it closes `_conn` — by then the *new* opening's connection, which leaks, and the catalog is unusable."""
    release = threading.Event()
    first = threading.Event()

    class Held(SqliteCatalog):
        def _open_sync(self, *args: object) -> object:
            if not first.is_set():
                first.set()
                release.wait(10)  # the first opening is slow (e.g. the file is locked)
            return super()._open_sync(*args)

    catalog = Held(tmp_path / "catalog.sqlite", request_timeout=5.0)

    async def main() -> None:
        opening = asyncio.create_task(catalog.open())
        await asyncio.sleep(0.2)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        await catalog.open()  # a retry on the same object
        release.set()
        for worker in [t for t in threading.enumerate() if t.name.startswith("mldash-catalog-sqlite")]:
            if worker is not threading.current_thread():
                await asyncio.to_thread(worker.join, 0.5)
        try:
            assert await catalog.get("nothing") is None, "the reopened catalog works"
        finally:
            await catalog.close()

    asyncio.run(main())


def test_a_loop_error_while_the_catalog_cannot_be_opened_loses_neither_error(settings: Settings,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The loop fails while the catalog's opening has failed too: run raises the loop's error, the opening's is
    logged — not left to asyncio's "Task exception was never retrieved" at garbage collection."""
    import gc

    from mldash.catalog.base import PermanentCatalogError
    from mldash_syncd.service import Daemon

    class Refusing(SlowOpeningCatalog):
        async def open(self) -> None:
            await asyncio.sleep(self.delay)
            raise PermanentCatalogError("authentication failed")

    async def broken_loop(self: Daemon, until_drained: bool, deadline: float | None) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("the loop broke")

    live = fast(settings)
    enqueue_bytes(live, os.urandom(500), filename="f0")
    monkeypatch.setattr(Daemon, "_loop", broken_loop)
    daemon = Daemon(live, catalog=Refusing(live, 0.05))
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="the loop broke"):
        asyncio.run(daemon.run(until_drained=True, max_wait=30))
    del daemon
    gc.collect()
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "never retrieved" in m], messages
    assert [m for m in messages if "could not be opened either" in m and "authentication failed" in m], messages


class Blackhole:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def test_blackholed_store_never_hangs_and_burns_no_attempts(settings: Settings, blackhole: Blackhole, drain,
                                                            moto_server: str) -> None:
    dead = fast(settings, store="s3://some-bucket/root", s3_endpoint_url=f"http://127.0.0.1:{blackhole.port}",
                part_size=5 * MIB, multipart_threshold=5 * MIB)
    small = enqueue_bytes(dead, b"abc", filename="small")
    big = enqueue_bytes(dead, os.urandom(6 * MIB), filename="big")

    started = time.monotonic()
    drain(dead, max_wait=3)
    elapsed = time.monotonic() - started

    assert elapsed < 30, f"drain with a blackholed store took {elapsed:.0f}s; every call must have a deadline"
    for entry in (small, big):
        row = rows(dead)[entry.id]
        assert row["state"] == State.QUEUED
        assert row["attempts"] == 0
        assert row["error_kind"] == "outage" and row["last_error"]


def test_max_wait_bounds_the_run_while_the_store_never_answers(settings: Settings, blackhole: Blackhole,
                                                               moto_server: str, drain) -> None:
    """`run --once --max-wait S` against a store that accepts connections and never answers (a firewall that
    drops, a dead load balancer) with the default 60 s request timeout: the run used to end only when the
    start-up gc's listing gave up, a minute later, and a SIGTERM could not cut that wait short either."""
    dead = settings.replace(store="s3://some-bucket/root", s3_endpoint_url=f"http://127.0.0.1:{blackhole.port}",
                            request_timeout=60.0, retry_base_delay=0.05, retry_max_delay=0.3)
    entry = enqueue_bytes(dead, b"abc", filename="small")
    started = time.monotonic()
    report = drain(dead, max_wait=3)
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"max wait 3 s, the run took {elapsed:.0f}s"
    assert report.remaining == {"queued": 1} and rows(dead)[entry.id]["attempts"] == 0


def test_a_store_that_never_answers_is_reported_before_the_deadline(settings: Settings, blackhole: Blackhole,
                                                                    moto_server: str, drain, monkeypatch,
                                                                    caplog) -> None:
    """With the default 60 s request timeout, a store that accepts connections and never answers left `run
    --once` and the journal silent for a minute. A call without an answer for SLOW_CALL_WARNING seconds is
    reported (once per stretch, not once per upload in flight)."""
    import mldash.store.s3 as s3

    monkeypatch.setattr(s3, "SLOW_CALL_WARNING", 1.0)
    dead = settings.replace(store="s3://some-bucket/root", s3_endpoint_url=f"http://127.0.0.1:{blackhole.port}",
                            request_timeout=60.0)
    for i in range(5):
        enqueue_bytes(dead, b"abc", filename=f"f{i}")
    with caplog.at_level("WARNING", logger="mldash.store"):
        drain(dead, max_wait=2.5)
    slow = [r.getMessage() for r in caplog.records if "no answer to" in r.getMessage()]
    assert len(slow) == 1, slow
    assert "store s3://some-bucket/root: no answer to" in slow[0] and "waiting up to 60s" in slow[0], slow


def test_index_write_failing_in_the_main_loop_is_retried_not_fatal(settings: Settings, monkeypatch) -> None:
    """The main loop's own index writes (claims, ingest) meet a full disk like any other: the daemon must
    skip the step and try again — dying would stop eviction, the one thing that frees the disk."""
    import sqlite3

    from mldash.spool.index import SpoolIndex
    from mldash_syncd import drain as run_drain

    entries = [enqueue_bytes(settings, os.urandom(1000), filename=f"f{i}") for i in range(3)]
    real_claim = SpoolIndex.claim
    failures = {"left": 3}

    def claim(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real_claim(self, *args, **kwargs)

    monkeypatch.setattr(SpoolIndex, "claim", claim)
    report = run_drain(settings, max_wait=30)
    assert failures["left"] == 0
    assert report.committed == len(entries) and report.clean


class _CancellationMaskedAsError(Wrapped):
    """Wraps a real store or catalog; `hung` calls wait forever (a server that cannot be selected) and, when
    cancelled, raise RuntimeError instead of CancelledError. That is what PyMongo does on CPython 3.11 when
    the cancellation lands while `asyncio.wait_for` re-acquires a Condition's lock ("Lock is not acquired");
    it marked an uploaded entry failed at the end of a `run --once` whose max wait ran out."""

    def __init__(self, inner: object, *hung: str) -> None:
        super().__init__(inner)
        self.calls = 0
        self.broken = False
        for name in hung:
            setattr(self, name, self._hang)

    async def _hang(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.broken:  # as the driver's lock is after that: later calls fail at once
            raise RuntimeError("Lock is not acquired.")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.broken = True
            raise RuntimeError("Lock is not acquired.") from None
        raise AssertionError("unreachable")


def test_an_error_raised_by_the_cancellation_at_stop_is_not_the_entrys_failure(settings: Settings, drain) -> None:
    from mldash.catalog import make_catalog
    from mldash.store import make_store

    small = settings.replace(multipart_threshold=64 * MIB)
    uploaded = [enqueue_bytes(small, os.urandom(1000), filename=f"c{i}") for i in range(3)]
    catalog = _CancellationMaskedAsError(make_catalog(small), "upsert_many")
    report = drain(small, catalog=catalog, max_wait=1.0)  # the commits hang; max wait cancels them

    assert catalog.calls >= 1 and report.failed == 0
    for entry in uploaded:
        row = rows(small)[entry.id]
        assert (row["state"], row["attempts"]) == (State.UPLOADED, 0), row["last_error"]

    queued = [enqueue_bytes(small, os.urandom(1000), filename=f"u{i}") for i in range(2)]
    store = _CancellationMaskedAsError(make_store(small), "put")
    catalog.broken = False
    report = drain(small, store=store, catalog=catalog, max_wait=1.0)  # the uploads hang too

    assert store.calls >= 1 and report.failed == 0
    for entry in queued:
        row = rows(small)[entry.id]
        assert (row["state"], row["attempts"]) == (State.QUEUED, 0), row["last_error"]

    assert drain(small).committed == 5  # nothing was lost on the way
    assert sorted(d["id"] for d in catalog_docs(small)) == sorted(str(e.id) for e in uploaded + queued)


class _HungPuts(Wrapped):
    """A real store whose single PUTs never answer."""

    async def put(self, *args: object, **kwargs: object) -> object:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_uploads_claimed_in_the_last_pass_are_not_charged_an_attempt(settings: Settings, drain) -> None:
    """The loop's last pass can claim entries and create their tasks just before it ends (here: the max wait
    is over at once). A task cancelled before its first step never runs its own handlers — the attempt refund
    among them — so the drain must let new tasks start before it cancels them."""
    from mldash.store import make_store

    entries = [enqueue_bytes(settings, os.urandom(1000), filename=f"f{i}") for i in range(3)]
    report = drain(settings, store=_HungPuts(make_store(settings)), max_wait=0.0)

    assert report.committed == 0 and report.failed == 0
    for entry in entries:
        row = rows(settings)[entry.id]
        assert (row["state"], row["attempts"], row["lease_owner"]) == (State.QUEUED, 0, None), row
    assert drain(settings).committed == 3
