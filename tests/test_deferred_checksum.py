"""MLDASH_CHECKSUM=deferred: saves skip the SHA256, the daemon computes it in its one read of the bytes;
MLDASH_CHECKSUM=auto (the default): the same for artifacts over sync_checksum_limit, 'sync' below it.

Every test drains through the real daemon and checks the store and the catalog directly (tests.backend_helpers):
the catalog's checksum must be the SHA256 of the bytes the save was given, never None — including after a
replay and when the commit happens in a later daemon process than the upload.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from mldash import Experiment
from mldash.config import Settings
from mldash.errors import ConfigError, SpoolCorruptError
from mldash.spool import SpoolIndex, SpoolLayout, State
from mldash.spool.hashing import HashingSink, copy_into
from mldash.spool.manifest import Manifest
from mldash.spool.recovery import read_manifest, rebuild
from tests.backend_helpers import catalog_docs, list_objects, read_object
from tests.fixtures.daemon import enqueue_bytes
from tests.spool_helpers import assert_spool_integrity, overwrite_spooled

MIB = 2**20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deferred(settings: Settings, **changes: Any) -> Settings:
    return settings.replace(checksum="deferred", part_size=5 * MIB, multipart_threshold=5 * MIB,
                            retry_base_delay=0.05, retry_max_delay=0.5, request_timeout=10.0, **changes)


def index_rows(settings: Settings) -> dict[int, dict[str, Any]]:
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        return {row["id"]: row for row in index.rows()}
    finally:
        index.close()


def docs_by_id(settings: Settings) -> dict[str, dict[str, Any]]:
    return {str(doc["id"]): doc for doc in catalog_docs(settings)}


@pytest.fixture(params=["embedded", "remote"])
def backend(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Deferred mode on the embedded defaults and on S3 (moto) + MongoDB (SecantusDB)."""
    base = deferred(settings)
    if request.param == "embedded":
        return base
    s3 = request.getfixturevalue("s3_settings")
    mongo = request.getfixturevalue("mongo_settings")
    return base.replace(store=s3.store, s3_endpoint_url=s3.s3_endpoint_url, catalog=mongo.catalog,
                        mongo_database=mongo.mongo_database)


# ---- configuration and the pieces ----------------------------------------------------------------------------

def test_checksum_setting_defaults_to_auto_and_parses_every_mode() -> None:
    default = Settings.load(env={"MLDASH_CONFIG": ""})
    assert default.checksum == "auto" and default.sync_checksum_limit == 64 * MIB
    assert default.hash_limit == 64 * MIB
    loaded = Settings.load(env={"MLDASH_CHECKSUM": "Deferred", "MLDASH_CONFIG": ""})
    assert loaded.checksum == "deferred" and loaded.hash_limit == 0
    loaded = Settings.load(env={"MLDASH_CHECKSUM": "sync", "MLDASH_CONFIG": ""})
    assert loaded.checksum == "sync" and loaded.hash_limit is None
    loaded = Settings.load(env={"MLDASH_SYNC_CHECKSUM_LIMIT": "1MiB", "MLDASH_CONFIG": ""})
    assert loaded.checksum == "auto" and loaded.hash_limit == MIB


def test_bogus_checksum_mode_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(env={"MLDASH_CHECKSUM": "bogus"})
    message = str(info.value)
    assert "checksum" in message and "MLDASH_CHECKSUM" in message and "'bogus'" in message
    assert "'auto'" in message and "'sync'" in message and "'deferred'" in message


def test_sink_without_hashing_writes_and_copies_the_same_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 17)
    source = tmp_path / "source"
    source.write_bytes(data)

    def copied(sink: HashingSink) -> None:
        with open(source, "rb") as handle:
            copy_into(handle, sink, chunk=MIB)

    for name, fill in (("written", lambda sink: [sink.write(data[:100]), sink.write(data[100:])]),
                       ("copied", copied)):
        target = tmp_path / name
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            sink = HashingSink(fd, hash_limit=0)
            fill(sink)
        finally:
            os.close(fd)
        assert sink.hexdigest() is None
        assert sink.size == len(data) and target.read_bytes() == data


@pytest.mark.parametrize(("size", "limit", "hashed"), [
    (3 * MIB, 3 * MIB, True),      # exactly at the limit: hashed
    (3 * MIB + 1, 3 * MIB, False),  # one byte over: not
    (3 * MIB, None, True),          # 'sync': no limit
])
@pytest.mark.parametrize("how", ["written", "copied", "copied-unknown-size"])
def test_sink_hashes_up_to_its_limit(tmp_path: Path, size: int, limit: int | None, hashed: bool, how: str) -> None:
    data = os.urandom(size)
    source = tmp_path / "source"
    source.write_bytes(data)
    target = tmp_path / "target"
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sink = HashingSink(fd, hash_limit=limit)
        if how == "written":  # torch.save-like: many writes, large ones hashed behind from the page cache
            for start in range(0, size, 700_000):
                sink.write(data[start:start + 700_000])
        elif how == "copied":  # upload(path): the size is known before the copy starts
            with open(source, "rb") as handle:
                copy_into(handle, sink, chunk=MIB)
        else:  # a stream without a file descriptor: the limit is crossed mid-copy
            copy_into(io.BytesIO(data), sink, chunk=MIB)
        digest = sink.hexdigest()
    finally:
        sink.close_hasher()
        os.close(fd)
    assert digest == (sha(data) if hashed else None)
    assert sink.size == size and target.read_bytes() == data


def test_auto_mode_returns_the_checksum_of_small_saves_and_defers_large_ones(settings: Settings, drain,
                                                                            tmp_path: Path) -> None:
    live = settings.replace(checksum="auto", sync_checksum_limit=MIB)
    files = Experiment(prefix="alice/proj/auto", settings=live).files("ckpt")
    small, large = os.urandom(MIB), os.urandom(MIB + 1)
    source = tmp_path / "large.bin"
    source.write_bytes(large)
    model = torch.nn.Linear(600, 600)  # ~1.4 MiB serialized
    state = {k: v.clone() for k, v in model.state_dict().items()}

    results = {"small": files.save_blob(small, to="small.bin"), "large": files.save_blob(large, to="large.bin"),
               "upload": files.upload(source, to="up.bin"), "torch": files.save_torch(model, to="m.pt")}

    assert results["small"]["checksum"] == sha(small) and results["small"]["checksumPending"] is False
    for name in ("large", "upload", "torch"):
        assert results[name]["checksum"] is None and results[name]["checksumPending"] is True, name
    assert drain(live).committed == 4
    docs = docs_by_id(live)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert docs[str(results["small"]["id"])]["checksum"] == sha(small)
    assert docs[str(results["large"]["id"])]["checksum"] == sha(large)
    assert docs[str(results["upload"]["id"])]["checksum"] == sha(large)
    torch_doc = docs[str(results["torch"]["id"])]
    assert torch_doc["sizeBytes"] > MIB and torch_doc["checksum"] == sha(read_object(live, torch_doc["storageKey"]))


@pytest.mark.parametrize(("checksum", "limit", "hashed"), [("auto", 1000, True), ("auto", 999, False),
                                                        ("deferred", 64 * MIB, False), ("sync", 0, True)])
def test_inline_saves_follow_the_checksum_mode(settings: Settings, drain, checksum: str, limit: int,
                                               hashed: bool) -> None:
    live = settings.replace(checksum=checksum, sync_checksum_limit=limit)
    data = os.urandom(1000)  # small enough to live inside its manifest
    result = Experiment(prefix="alice/proj/inline", settings=live).files("m").save_blob(data, to="d.bin")
    assert read_manifest(SpoolLayout(live.spool), int(result["id"])).inline
    assert result["checksum"] == (sha(data) if hashed else None)
    assert drain(live).committed == 1
    assert docs_by_id(live)[str(result["id"])]["checksum"] == sha(data)


def test_manifest_accepts_a_missing_sha256_and_still_rejects_malformed_ones(settings: Settings) -> None:
    manifest = enqueue_bytes(deferred(settings), b"payload")
    assert manifest.sha256 is None
    assert Manifest.decode(manifest.encode()).sha256 is None
    raw = msgpack.unpackb(manifest.encode())
    for bad in ("x" * 64, "A" * 64, "0" * 63, 12, b"\0" * 32):
        with pytest.raises(SpoolCorruptError, match="sha256"):
            Manifest.decode(msgpack.packb({**raw, "sha256": bad}, use_bin_type=True))


# ---- the client: results, read-your-writes -------------------------------------------------------------------

def test_sync_mode_still_returns_the_checksum(settings: Settings) -> None:
    result = Experiment(prefix="alice/proj/sync", settings=settings).files("ckpt").save_blob(b"abc", "a.bin")
    assert result["checksum"] == sha(b"abc") and result["checksumPending"] is False


def test_deferred_saves_return_no_checksum_then_the_catalog_has_the_right_one(settings: Settings, drain,
                                                                              tmp_path: Path) -> None:
    live = deferred(settings)
    files = Experiment(prefix="alice/proj/deferred", settings=live).files("ckpt")
    blob = os.urandom(200_000)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(6 * MIB + 5))  # multipart with 5 MiB parts
    uploaded_bytes = source.read_bytes()
    model = torch.nn.Linear(64, 32)
    expected_torch = io.BytesIO()
    torch.save(model.state_dict(), expected_torch)

    results = {"blob": files.save_blob(blob, "b.bin"), "upload": files.upload(source),
               "torch": files.save_torch(model, "model.pt")}
    source.write_bytes(b"changed after the call")  # snapshot semantics hold in deferred mode too

    for result in results.values():
        assert result["checksum"] is None and result["checksumPending"] is True and result["status"] == "queued"
        assert read_manifest(SpoolLayout(live.spool), int(result["id"])).sha256 is None
    listed = {e["id"]: e for e in files.list()}
    assert all(listed[r["id"]]["checksum"] is None and listed[r["id"]]["checksumPending"] for r in results.values())
    # Before the daemon ran: a download from the spool is a plain copy (there is nothing to verify it against).
    got = files.download(results["blob"]["id"], tmp_path / "early.bin")
    assert Path(got).read_bytes() == blob

    report = drain(live)

    assert report.committed == 3 and report.clean
    docs = docs_by_id(live)
    torch_bytes = read_object(live, docs[results["torch"]["id"]]["storageKey"])
    assert torch.load(io.BytesIO(torch_bytes), weights_only=True).keys() == model.state_dict().keys()
    expected = {"blob": blob, "upload": uploaded_bytes, "torch": torch_bytes}
    for name, result in results.items():
        doc = docs[result["id"]]
        assert read_object(live, doc["storageKey"]) == expected[name]
        assert doc["checksum"] == sha(expected[name]), name
        assert doc["sizeBytes"] == len(expected[name])
        entry = files.get(result["id"])
        assert entry["checksum"] == doc["checksum"] and entry["checksumPending"] is False
        assert entry["status"] in ("committed", "evicted")
    assert Path(files.download(results["upload"]["id"], tmp_path / "late.bin")).read_bytes() == uploaded_bytes


# ---- the daemon ---------------------------------------------------------------------------------------------

def test_small_and_multipart_entries_commit_with_the_computed_checksum(backend: Settings, drain) -> None:
    payloads = {"tiny.bin": b"x", "small.bin": os.urandom(100_000), "five.bin": os.urandom(5 * MIB),
                "big.bin": os.urandom(11 * MIB + 123)}
    manifests = {name: enqueue_bytes(backend, data, filename=name) for name, data in payloads.items()}
    assert all(m.sha256 is None for m in manifests.values())

    report = drain(backend)

    assert report.committed == 4 and report.clean
    docs = docs_by_id(backend)
    for name, manifest in manifests.items():
        assert read_object(backend, manifest.key()) == payloads[name]
        assert docs[str(manifest.id)]["checksum"] == sha(payloads[name]), name


def test_replay_after_reindex_changes_nothing(backend: Settings, drain) -> None:
    keep = backend.replace(keep_committed=100)
    payloads = [os.urandom(10), os.urandom(6 * MIB)]
    manifests = [enqueue_bytes(keep, data, filename=f"f{i}") for i, data in enumerate(payloads)]
    assert drain(keep).committed == 2
    objects_before, docs_before = list_objects(keep), catalog_docs(keep)
    layout = SpoolLayout(keep.spool)
    index = SpoolIndex(layout)
    try:
        assert_spool_integrity(layout, index)  # the computed sha256 in the index is the bytes'
    finally:
        index.close()

    rebuild(layout)  # everything back to queued, sha256 back to the manifest's None
    assert all(row["sha256"] is None for row in index_rows(keep).values())
    report = drain(keep)

    assert report.committed == 2 and report.clean
    assert list_objects(keep) == objects_before
    assert catalog_docs(keep) == docs_before
    rows = index_rows(keep)
    for manifest, data in zip(manifests, payloads, strict=True):
        assert rows[manifest.id]["state"] == "committed" and rows[manifest.id]["sha256"] == sha(data)


def test_commit_in_a_later_daemon_process_records_the_checksum_computed_at_upload(
        settings: Settings, mongo_server_process, drain, daemon_process) -> None:
    server = mongo_server_process()
    live = deferred(settings, catalog=server.uri, mongo_database="mldash_deferred")
    server.stop()
    payloads = [os.urandom(3000), os.urandom(6 * MIB + 1)]
    manifests = [enqueue_bytes(live, data, filename=f"f{i}") for i, data in enumerate(payloads)]

    report = drain(live, max_wait=4)  # the catalog is down: uploads happen, commits wait

    assert report.committed == 0
    rows = index_rows(live)
    for manifest, data in zip(manifests, payloads, strict=True):
        assert rows[manifest.id]["state"] == State.UPLOADED
        assert rows[manifest.id]["sha256"] == sha(data), "the upload's computed checksum must be kept for the commit"
    files = Experiment(prefix="ns/proj/exp", settings=live).files("ckpt")
    entry = files.get(str(manifests[0].id))  # read-your-writes: the daemon's checksum, before commit
    assert entry["status"] == "uploaded" and entry["checksum"] == sha(payloads[0])

    server.start()
    assert daemon_process(live, "run", "--once").wait(timeout=120) == 0

    docs = docs_by_id(live)
    for manifest, data in zip(manifests, payloads, strict=True):
        assert docs[str(manifest.id)]["checksum"] == sha(data)
        assert read_object(live, manifest.key()) == data


def test_uploaded_row_without_a_checksum_is_read_again_not_committed_blank(settings: Settings, drain) -> None:
    """Defensive path: an uploaded entry whose computed checksum is missing goes back to the queue (the object
    already in the store is verified from the spooled bytes) instead of reaching the catalog without one."""
    live = deferred(settings, keep_committed=10)
    data = os.urandom(4000)
    manifest = enqueue_bytes(live, data)
    assert drain(live, max_wait=30).committed == 1
    index = SpoolIndex(SpoolLayout(live.spool))
    try:  # pretend the commit had not happened and the checksum was lost
        index.conn.execute("UPDATE entries SET state='uploaded', sha256=NULL WHERE id=?", (manifest.id,))
    finally:
        index.close()

    assert drain(live).committed == 1
    assert docs_by_id(live)[str(manifest.id)]["checksum"] == sha(data)
    assert index_rows(live)[manifest.id]["sha256"] == sha(data)


def test_what_deferred_mode_gives_up_corruption_in_the_spool_is_not_detected(settings: Settings, drain) -> None:
    """The documented trade-off: bytes altered in the spool before the daemon reads them are uploaded as they are
    (sync mode quarantines them: see test_daemon_pipeline). The catalog's checksum still matches the stored bytes."""
    live = deferred(settings)
    manifest = enqueue_bytes(live, b"A" * 1000)
    overwrite_spooled(SpoolLayout(live.spool), manifest.id, b"B" * 1000)

    assert drain(live).committed == 1
    assert read_object(live, manifest.key()) == b"B" * 1000
    assert docs_by_id(live)[str(manifest.id)]["checksum"] == sha(b"B" * 1000)


def test_a_state_dict_is_sized_by_its_storages_each_counted_once() -> None:
    from mldash.serializers import _tensor_bytes

    weight = torch.zeros(1000, dtype=torch.float32)
    state = {"a": weight, "b": weight[:10], "nested": {"c": torch.ones(250, dtype=torch.float64)},
             "list": [torch.zeros(3, dtype=torch.int8)], "step": 7}
    assert _tensor_bytes(torch, state) == 4000 + 2000 + 3  # weight's storage once, though two tensors share it
    assert _tensor_bytes(torch, {"step": 7}) is None


def test_a_save_estimated_above_the_limit_is_not_hashed_at_all(settings: Settings) -> None:
    """Hashing a 1 GiB torch.save up to the 64 MiB limit and then giving up cost the save ~40 ms for
    nothing: a save whose size estimate is above the limit does not start hashing."""
    from mldash.spool.enqueue import Enqueuer

    enqueuer = Enqueuer(settings.replace(checksum="auto", sync_checksum_limit=MIB))
    assert enqueuer._hash_limit(None) == MIB and enqueuer._hash_limit(MIB) == MIB
    assert enqueuer._hash_limit(MIB + 1) == 0
    assert Enqueuer(settings.replace(checksum="sync"))._hash_limit(10 * MIB) is None  # sync hashes everything

    exp = Experiment(prefix="ns/proj/exp", settings=settings.replace(checksum="auto", sync_checksum_limit=MIB))
    big, small = torch.nn.Linear(1024, 512), torch.nn.Linear(64, 32)  # ~2 MiB and ~8 KiB of weights
    assert exp.files("m").save_torch(big, to="big.pt")["checksum"] is None
    assert exp.files("m").save_torch(small, to="small.pt")["checksum"] is not None
