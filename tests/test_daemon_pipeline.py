"""mldash-syncd end to end, against the embedded backends and against S3 (moto) + MongoDB (SecantusDB)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout, State
from mldash.spool.recovery import rebuild
from tests.backend_helpers import catalog_docs, list_objects, pending_uploads, read_object
from tests.faults.wrapped import Wrapped
from tests.fixtures.daemon import enqueue_bytes
from tests.spool_helpers import flip_spooled_byte, overwrite_spooled

MIB = 2**20


@pytest.fixture(params=["embedded", "remote"])
def backend(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The same tests on the zero-setup default (directory + SQLite) and on S3 + MongoDB."""
    base = settings.replace(part_size=5 * MIB, multipart_threshold=5 * MIB, retry_base_delay=0.05,
                            retry_max_delay=0.5, request_timeout=10.0)
    if request.param == "embedded":
        return base
    s3 = request.getfixturevalue("s3_settings")
    mongo = request.getfixturevalue("mongo_settings")
    return base.replace(store=s3.store, s3_endpoint_url=s3.s3_endpoint_url, catalog=mongo.catalog,
                        mongo_database=mongo.mongo_database)


def index_rows(settings: Settings) -> dict[int, dict[str, Any]]:
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        return {row["id"]: row for row in index.rows()}
    finally:
        index.close()


def test_drains_small_and_multipart_files_exactly_once(backend: Settings, drain) -> None:
    payloads = {"tiny.bin": b"x", "small.bin": os.urandom(100_000), "big.bin": os.urandom(12 * MIB + 123)}
    manifests = {name: enqueue_bytes(backend, data, filename=name, tags=["t1"], metadata={"epoch": 3},
                                     description="d") for name, data in payloads.items()}

    report = drain(backend)

    assert report.committed == 3 and report.clean
    docs = {doc["id"]: doc for doc in catalog_docs(backend)}
    assert len(docs) == 3
    for name, manifest in manifests.items():
        assert read_object(backend, manifest.key()) == payloads[name]
        doc = docs[str(manifest.id)]
        assert doc["checksum"] == hashlib.sha256(payloads[name]).hexdigest()
        assert doc["sizeBytes"] == len(payloads[name])
        assert (doc["filename"], doc["path"], doc["namespace"], doc["project"], doc["experiment"]) == (
            name, "/ckpt", "ns", "proj", "exp")
        assert doc["tags"] == ["t1"] and doc["metadata"] == {"epoch": 3} and doc["description"] == "d"
        assert doc["storageKey"].endswith(manifest.key())
    assert pending_uploads(backend) == []
    # committed entries were evicted (keep_committed=0): their bytes left the spool
    assert os.listdir(SpoolLayout(backend.spool).blobs_dir) == []


def test_replay_after_reindex_changes_nothing(backend: Settings, drain) -> None:
    """Idempotent steps: a rebuilt index re-verifies what is already stored, re-sends nothing."""
    keep = backend.replace(keep_committed=100)
    manifests = [enqueue_bytes(keep, os.urandom(size), filename=f"f{size}") for size in (10, 6 * MIB)]
    assert drain(keep).committed == 2
    objects_before, docs_before = list_objects(keep), catalog_docs(keep)

    rebuild(SpoolLayout(keep.spool))  # everything back to queued
    report = drain(keep)

    assert report.committed == 2
    assert list_objects(keep) == objects_before
    assert catalog_docs(keep) == docs_before  # same documents, committedAt unchanged
    rows = index_rows(keep)
    assert all(rows[m.id]["state"] == "committed" for m in manifests)
    big = manifests[1]
    assert rows[big.id]["bytes_sent"] == 0, "the multipart object already stored must not be re-sent"


@pytest.mark.parametrize("size", [1000, 200_000, 7 * MIB], ids=["inline", "single", "multipart"])
def test_spooled_byte_flipped_is_quarantined_never_committed(backend: Settings, drain, size: int) -> None:
    bad = enqueue_bytes(backend, os.urandom(size), filename="bad.bin")
    good = enqueue_bytes(backend, os.urandom(size), filename="good.bin")
    assert bad.inline == (size <= backend.inline_max)
    # bit rot / a writer that did not respect the snapshot
    flip_spooled_byte(SpoolLayout(backend.spool), bad.id, size // 2)

    report = drain(backend)

    rows = index_rows(backend)
    assert rows[bad.id]["state"] == State.QUARANTINED
    assert "sha256" in rows[bad.id]["last_error"]
    assert rows[good.id]["state"] in (State.COMMITTED, State.EVICTED)
    assert not report.clean
    assert [doc["id"] for doc in catalog_docs(backend)] == [str(good.id)]
    assert read_object(backend, bad.key()) is None
    assert pending_uploads(backend) == []  # the aborted multipart upload is gone


@pytest.mark.parametrize("change", ["longer", "shorter", "missing"])
@pytest.mark.parametrize("size", [200_000, 7 * MIB], ids=["single", "multipart"])
def test_blob_whose_size_changed_is_quarantined(backend: Settings, drain, size: int, change: str) -> None:
    data = os.urandom(size)
    bad = enqueue_bytes(backend, data, filename="bad.bin")
    good = enqueue_bytes(backend, data, filename="good.bin")
    blob = SpoolLayout(backend.spool).blob_path(bad.id)
    if change == "longer":
        blob.write_bytes(data + b"!")
    elif change == "shorter":
        blob.write_bytes(data[:-1])
    else:
        blob.unlink()

    report = drain(backend)

    rows = index_rows(backend)
    assert rows[bad.id]["state"] == State.QUARANTINED, rows[bad.id]["last_error"]
    assert rows[good.id]["state"] in (State.COMMITTED, State.EVICTED)
    assert not report.clean
    assert read_object(backend, bad.key()) is None
    assert read_object(backend, good.key()) == data


def test_run_once_exit_status_reports_failures(backend: Settings, drain) -> None:
    enqueue_bytes(backend, b"fine", filename="ok.bin")
    assert drain(backend).clean


@pytest.mark.parametrize("size", [4096, 200_000], ids=["inline", "blob"])
def test_retry_requeues_quarantined_entry_after_repair(backend: Settings, drain, size: int) -> None:
    data = os.urandom(size)
    entry = enqueue_bytes(backend, data, filename="x.bin")
    layout = SpoolLayout(backend.spool)
    overwrite_spooled(layout, entry.id, b"\0" * len(data))
    drain(backend)
    assert index_rows(backend)[entry.id]["state"] == State.QUARANTINED

    overwrite_spooled(layout, entry.id, data)  # a person restores the right bytes
    index = SpoolIndex(SpoolLayout(backend.spool))
    assert index.retry([entry.id]) == [entry.id]
    index.close()
    assert drain(backend).committed == 1
    assert read_object(backend, entry.key()) == data


def resaved_as(settings: Settings, entry_id: int) -> int:
    row = index_rows(settings)[entry_id]
    assert row["state"] == State.RESAVED and row["resaved_as"], row
    return row["resaved_as"]


def reads_follow(settings: Settings, old_id: int, new_id: int, data: bytes, tmp_path) -> None:
    """What the saving process holds is the old id: wait and get by it follow to the entry it became."""
    from mldash import Experiment

    exp = Experiment(prefix="ns/proj/exp", settings=settings)
    files = exp.files("ckpt")
    assert exp._reader()._followed_rows([old_id])[old_id]["id"] == new_id  # not the catalog's file under old_id
    assert exp._reader().wait([old_id], timeout=30)[str(old_id)] in ("committed", "evicted")  # flush()'s wait
    got = files.get(old_id)
    assert got["id"] == str(new_id) and got["checksum"] == hashlib.sha256(data).hexdigest()
    out = files.download(old_id, dest_path=tmp_path / "back.bin")
    assert Path(out).read_bytes() == data


def test_catalog_id_already_taken_by_another_file_is_resaved_under_a_new_id(backend: Settings, drain,
                                                                           tmp_path) -> None:
    """A replayed upsert is a no-op — so an id clash with a *different* file must not pass for a replay. It used
    to be quarantined for good (an offline job's artifact cannot be saved again); the artifact now goes on under a
    new id, its upload under the old one is removed, and the other file is untouched."""
    import asyncio
    import dataclasses

    from mldash.catalog import make_catalog
    from mldash_syncd.commit import document_for

    entry = enqueue_bytes(backend, b"mine", filename="mine.bin")
    other = dataclasses.replace(entry, filename="theirs.bin", sha256=hashlib.sha256(b"theirs").hexdigest())

    async def plant() -> None:
        async with make_catalog(backend) as catalog:
            await catalog.upsert(document_for(other, store_url=backend.store, store_key="files/x/theirs.bin",
                                              committed_at=1.0))

    asyncio.run(plant())
    report = drain(backend)

    new_id = resaved_as(backend, entry.id)
    assert index_rows(backend)[new_id]["state"] in ("committed", "evicted") and report.committed == 1
    assert report.quarantined == 0 and report.clean
    docs = {d["id"]: d for d in catalog_docs(backend)}
    assert docs[str(entry.id)]["filename"] == "theirs.bin"  # the other file's, untouched
    assert docs[str(new_id)]["filename"] == "mine.bin" and docs[str(new_id)]["checksum"] == entry.sha256
    moved = dataclasses.replace(entry, id=new_id)
    assert read_object(backend, moved.key()) == b"mine"
    assert read_object(backend, entry.key()) is None  # our upload under the taken id: removed
    layout = SpoolLayout(backend.spool)
    assert not layout.manifest_path(entry.id).exists() and not layout.blob_path(entry.id).exists()
    reads_follow(backend, entry.id, new_id, b"mine", tmp_path)
    from tests.test_daemon_process import cli

    listed = cli(backend, "ls", "--state", "resaved").stdout
    assert f"re-saved as {new_id}: commit: catalog id {entry.id} already belongs to another file" in listed, listed
    assert f"re-saved as {new_id} (its id belonged to another file" in cli(backend, "show", str(entry.id)).stdout


class StoreWithoutChecksums(Wrapped):
    """A store that records no SHA256 (older MinIO, Ceph RGW): its objects report none."""

    async def head(self, key: str):
        stored = await self._inner.head(key)
        return stored and dataclasses.replace(stored, checksum_sha256=None)


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize("committed", [True, False], ids=["committed", "uncommitted"])
@pytest.mark.parametrize("size", [100, 6 * MIB], ids=["single", "multipart"])
def test_another_files_object_at_our_key_is_never_removed(backend: Settings, drain, size: int, tmp_path,
                                                          committed: bool, checksums: bool) -> None:
    """Ids are unique across hosts only with high probability; two files with the same id and the same names have
    the same key. The daemon judged an object found at its key by its checksum and, finding other bytes, removed
    it as a damaged attempt of its own — losing the other file: committed already, or about to be (its daemon
    uploaded, not yet committed), on a store with or without checksums. Now only a provably damaged write of ours
    is removed; the object stays, and this artifact goes on under a new id."""
    import asyncio
    import dataclasses

    from mldash.catalog import make_catalog
    from mldash.store import make_store
    from mldash.store.base import b64_sha256
    from mldash_syncd.commit import document_for

    mine, theirs = os.urandom(size), os.urandom(size + 7)
    entry = enqueue_bytes(backend, mine, filename="metrics.bin")
    other = dataclasses.replace(entry, size=len(theirs), sha256=hashlib.sha256(theirs).hexdigest())

    async def plant() -> None:  # the other host's daemon got there first: its object (then its commit)
        async with make_store(backend) as store:
            key = store.key(entry.key())
            await store.put(key, theirs, b64_sha256(theirs))
        if committed:
            async with make_catalog(backend) as catalog:
                await catalog.upsert(document_for(other, store_url=backend.store, store_key=key, committed_at=1.0))

    asyncio.run(plant())
    report = drain(backend, **({} if checksums else {"store": StoreWithoutChecksums(make_store(backend))}))

    assert read_object(backend, entry.key()) == theirs
    new_id = resaved_as(backend, entry.id)
    assert "the store holds another file's object at" in index_rows(backend)[entry.id]["last_error"]
    assert report.committed == 1 and report.clean
    assert read_object(backend, dataclasses.replace(entry, id=new_id).key()) == mine
    expected = {str(new_id): entry.sha256, **({str(entry.id): other.sha256} if committed else {})}
    assert {d["id"]: d["checksum"] for d in catalog_docs(backend)} == expected
    reads_follow(backend, entry.id, new_id, mine, tmp_path)


class CatalogDownForReads(Wrapped):
    """A catalog that cannot be reached for a while: its reads fail as an outage."""

    def __init__(self, inner, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    async def get(self, file_id: str):
        from mldash.catalog.base import TransientCatalogError

        if self.failures > 0:
            self.failures -= 1
            raise TransientCatalogError("catalog at mongodb://db:27017: no server reachable")
        return await self._inner.get(file_id)


def test_a_catalog_outage_met_by_an_upload_is_the_catalogs(settings: Settings) -> None:
    """Finding an object with other bytes at its key, an upload asks the catalog whose it is. The catalog being
    down then is the catalog's outage: it used to close the store's gate (every upload paused, `status` said the
    store was unreachable)."""
    import asyncio

    from mldash.catalog import make_catalog
    from mldash.store import make_store
    from mldash.store.base import b64_sha256
    from mldash_syncd.service import Daemon

    fast = settings.replace(retry_base_delay=0.01, retry_max_delay=0.05)
    entry = enqueue_bytes(fast, b"mine", filename="m.bin")

    async def plant() -> None:  # another file's bytes at our key, uncommitted
        async with make_store(fast) as store:
            await store.put(store.key(entry.key()), b"theirs", b64_sha256(b"theirs"))

    asyncio.run(plant())
    problems: list[tuple[str | None, str | None]] = []
    daemon = Daemon(fast, catalog=CatalogDownForReads(make_catalog(fast), failures=1))
    original = daemon._route_failure

    def observed(row, exc, **kwargs):
        original(row, exc, **kwargs)
        problems.append((daemon.store_gate.last_error, daemon.catalog_gate.last_error))

    daemon._route_failure = observed
    report = asyncio.run(daemon.run(until_drained=True, max_wait=60))

    assert problems and problems[0][0] is None, problems  # the store's gate stayed open
    assert "no server reachable" in (problems[0][1] or ""), problems
    assert report.committed == 1 and report.clean  # and then, the catalog back: re-saved under a new id
    assert read_object(fast, dataclasses.replace(entry, id=resaved_as(fast, entry.id)).key()) == b"mine"


def test_a_resave_a_crash_cut_short_is_finished_at_the_next_start(settings: Settings, drain) -> None:
    """The move is recorded before the new entry's files exist; a daemon killed in between leaves the old entry
    `resaved` with its files: the next start publishes the new entry and removes the old files — one delivery."""
    from mldash.ids import new_id

    entry = enqueue_bytes(settings, b"moved", filename="m.bin")
    layout = SpoolLayout(settings.spool)
    index = SpoolIndex(layout)
    from mldash.spool.recovery import ingest_new
    assert ingest_new(index, layout, set()) == [entry.id]
    target = new_id()
    index.transition(entry.id, State.RESAVED, resaved_as=target, last_error="commit: clash", error_kind="clash")
    index.close()

    report = drain(settings)

    assert report.committed == 1
    assert not layout.manifest_path(entry.id).exists() and not layout.blob_path(entry.id).exists()
    assert [int(d["id"]) for d in catalog_docs(settings)] == [target]


def test_multipart_files_at_once_are_limited_to_the_parts_in_flight(settings: Settings, drain) -> None:
    """Many file slots keep small files flowing; large files beyond the parts budget would only open uploads
    that wait for a buffer (and delay every file's commit), so at most max_concurrent_parts run at once."""
    local = settings.replace(part_size=5 * MIB, multipart_threshold=5 * MIB, max_concurrent_parts=2,
                             max_concurrent_files=64)
    big = [enqueue_bytes(local, os.urandom(5 * MIB + i), filename=f"big{i}.bin") for i in range(6)]
    small = [enqueue_bytes(local, os.urandom(1000 + i), filename=f"small{i}.bin") for i in range(20)]
    sizes = {m.id: m.size for m in big + small}
    running: set[int] = set()
    most_multipart = 0

    def on_event(kind: str, data: dict[str, Any]) -> None:
        nonlocal most_multipart
        if kind == "uploading":
            running.add(data["id"])
        elif kind in ("uploaded", "failed", "quarantined"):
            running.discard(data["id"])
        most_multipart = max(most_multipart, sum(1 for i in running if sizes[i] >= 5 * MIB))

    report = drain(local, on_event=on_event)

    assert report.committed == 26 and report.clean
    assert 1 <= most_multipart <= 2
    rows = index_rows(local)
    # Every byte put on the wire is counted, small files included (their count rides on the outcome's write).
    assert all(row["bytes_sent"] == sizes[file_id] for file_id, row in rows.items())


def test_a_large_backlog_starts_uploading_before_it_is_all_indexed(settings: Settings, drain, monkeypatch) -> None:
    """A spool synced days later holds many entries: the first uploads start after the first chunk of
    manifests has been indexed, not after all of them; oldest first, and everything still drains once."""
    from mldash_syncd import service

    monkeypatch.setattr(service, "INGEST_CHUNK", 8)
    entries = [enqueue_bytes(settings, os.urandom(100), filename=f"f{i}") for i in range(40)]
    order: list[tuple[str, int]] = []
    report = drain(settings, on_event=lambda kind, data: order.append((kind, int(data["id"])))
                   if kind in ("queued", "uploading") else None)

    assert report.committed == 40 and report.clean
    queued = [file_id for kind, file_id in order if kind == "queued"]
    assert queued == sorted(e.id for e in entries), "every entry indexed once, oldest first"
    first_upload = next(i for i, (kind, _) in enumerate(order) if kind == "uploading")
    indexed_before = sum(1 for kind, _ in order[:first_upload] if kind == "queued")
    assert indexed_before == 8, f"{indexed_before} entries were indexed before the first upload started"
    assert sorted(int(d["id"]) for d in catalog_docs(settings)) == sorted(e.id for e in entries)


def test_committed_bytes_leave_the_spool_soon_even_right_after_another_eviction(settings: Settings,
                                                                                 monkeypatch) -> None:
    """A save waiting for quota room waits for eviction. A commit that landed less than EVICT_INTERVAL after the
    previous eviction pass was evicted only at the next rescan (2 s; here made 30 s to tell the two apart): saves
    at quota stalled ~2 s each. Its pass now comes EVICT_INTERVAL later."""
    import asyncio
    import threading
    import time

    import mldash_syncd.service as service
    from mldash_syncd import Daemon

    monkeypatch.setattr(service, "RESCAN_INTERVAL", 30.0)
    layout = SpoolLayout(settings.spool)
    committed: dict[int, float] = {}
    daemon = Daemon(settings, on_event=lambda kind, data: committed.setdefault(data["id"], time.monotonic())
                    if kind == "committed" else None)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=lambda: loop.run_until_complete(daemon.run()), daemon=True)
    runner.start()
    try:
        latencies = []
        for i in range(3):  # back to back: each commit lands right after the previous eviction
            entry = enqueue_bytes(settings, os.urandom(1000), filename=f"f{i}")
            deadline = time.monotonic() + 60
            while layout.manifest_path(entry.id).exists() or entry.id not in committed:
                assert time.monotonic() < deadline, "never committed and evicted"
                time.sleep(0.005)
            latencies.append(time.monotonic() - committed[entry.id])
        assert max(latencies) < 10, latencies  # EVICT_INTERVAL (0.25 s) plus a pass, not the 30 s rescan
    finally:
        loop.call_soon_threadsafe(daemon.request_stop)
        runner.join(timeout=60)
        loop.close()


def test_saves_an_older_client_accepted_are_still_uploaded(settings: Settings, drain) -> None:
    """Names and tags with C1 controls, bidi or line-separator characters, and tags with DEL, are refused for new
    saves since session 8 — but a spool written by an earlier client may hold them: the daemon checks a manifest
    against the rules it was saved under (path safety), so those entries upload instead of being quarantined."""
    names = ["a\x85b.bin", "rtl\u200fname.bin", "line\u2028sep.bin", "model\u202egnp.exe"]
    entries = [enqueue_bytes(settings, os.urandom(100), filename=name, tags=["best\x7f"]) for name in names]
    deep: list = []
    for _ in range(150):  # deeper than new saves may nest (100), as an older client let it
        deep = [deep]
    entries.append(enqueue_bytes(settings, b"deep", filename="deep.bin", metadata={"d": deep}))
    report = drain(settings)
    assert report.committed == len(entries) and report.clean, report
    assert sorted(d["filename"] for d in catalog_docs(settings)) == sorted([*names, "deep.bin"])
    from mldash import Experiment

    exp = Experiment(prefix="ns/proj/exp", settings=settings)
    assert exp.files("ckpt").get("rtl\u200fname.bin")["filename"] == "rtl\u200fname.bin"  # readable by path
