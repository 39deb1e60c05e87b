"""Atomic enqueue: what lands in the spool, what never does, id collisions, durability, permissions."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

import mldash.spool.enqueue as enqueue_module
import mldash.spool.newfile as newfile
from mldash.errors import FileTooLargeError, SpoolCorruptError, SpoolFullError
from mldash.ids import new_id
from mldash.spool.enqueue import Enqueuer
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import DaemonLock
from mldash.spool.manifest import FORMAT_VERSION, INLINE_FORMAT_VERSION, Manifest
from mldash.spool.recovery import ingest_new, manifest_ids, open_spooled, read_manifest
from tests.spool_helpers import Ack, assert_private_modes, assert_spool_integrity, make_settings, put, spec


@pytest.fixture
def enqueuer(tmp_path: Path) -> Enqueuer:
    return Enqueuer(make_settings(tmp_path / "spool"))


@pytest.fixture
def blob_enqueuer(tmp_path: Path) -> Enqueuer:
    """Every entry a blob + a manifest, however small (inline_max=0): the blob path's own mechanics."""
    return Enqueuer(make_settings(tmp_path / "spool", inline_max=0))


def test_entry_lands_complete_with_its_manifest(enqueuer: Enqueuer) -> None:
    data = os.urandom(300_000)  # above the parallel-hash threshold
    manifest = put(enqueuer, data, "model.pt", description="d", tags=["a"], metadata={"step": 3})
    layout = enqueuer.layout
    assert layout.blob_path(manifest.id).read_bytes() == data
    assert read_manifest(layout, manifest.id) == manifest
    assert (manifest.size, manifest.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert manifest.format == FORMAT_VERSION and manifest.pid == os.getpid() and manifest.host
    assert os.listdir(layout.tmp_dir) == []
    public = manifest.to_public()
    assert public["path"] == "/ckpt" and public["checksum"] == manifest.sha256 and public["id"] == str(manifest.id)
    assert_spool_integrity(layout)


def test_many_small_writes_are_hashed_in_order(enqueuer: Enqueuer) -> None:
    chunks = [os.urandom(n) for n in (1, 0, 5000, 262_144, 1_000_000, 7)]

    def write(sink):
        for chunk in chunks:
            sink.write(chunk)

    manifest = enqueuer.enqueue(spec(), write)
    assert manifest.sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert enqueuer.layout.blob_path(manifest.id).read_bytes() == b"".join(chunks)


def _nothing_written(layout: SpoolLayout) -> None:
    assert os.listdir(layout.tmp_dir) == []
    assert os.listdir(layout.blobs_dir) == []
    assert os.listdir(layout.manifests_dir) == []


def test_failing_serializer_leaves_nothing(enqueuer: Enqueuer) -> None:
    def write(sink):
        sink.write(b"x" * 1000)
        raise RuntimeError("serializer exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        enqueuer.enqueue(spec(), write)
    _nothing_written(enqueuer.layout)


def test_too_large_is_refused_before_and_after_writing(tmp_path: Path) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", max_file_size=1000))
    with pytest.raises(FileTooLargeError, match=r"'a.bin' is 5000 bytes; the maximum is 1000"):
        put(enqueuer, b"x" * 5000)
    with pytest.raises(FileTooLargeError, match="serialized to 1001 bytes"):
        enqueuer.enqueue(spec(), lambda sink: sink.write(b"y" * 1001))  # size unknown in advance
    _nothing_written(enqueuer.layout)


def test_entry_larger_than_the_quota_fails_at_once(tmp_path: Path) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="1MiB", save_timeout=60))
    with pytest.raises(SpoolFullError, match="can never fit the spool quota of 1048576 bytes") as info:
        put(enqueuer, b"x" * (2**20 + 1))
    assert (info.value.requested, info.value.quota) == (2**20 + 1, 2**20)
    _nothing_written(enqueuer.layout)


def test_manifest_is_never_committed_short(enqueuer: Enqueuer, monkeypatch: pytest.MonkeyPatch) -> None:
    """write(2) may write less than asked (a filling disk, a signal); the manifest must still be whole."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, memoryview(data)[:100]))
    manifest = put(enqueuer, os.urandom(5000), metadata={"blob": "x" * 2000})
    monkeypatch.undo()
    assert read_manifest(enqueuer.layout, manifest.id) == manifest
    assert_spool_integrity(enqueuer.layout)


def test_id_collision_on_blob_draws_a_fresh_id(blob_enqueuer: Enqueuer, monkeypatch: pytest.MonkeyPatch) -> None:
    enqueuer = blob_enqueuer
    first = put(enqueuer, b"first")
    fresh = new_id()
    ids = iter([first.id, fresh])  # the next entry collides with the first, then gets a fresh id
    monkeypatch.setattr(enqueue_module, "new_id", lambda: next(ids))
    second = put(enqueuer, b"second", "b.bin")
    assert second.id == fresh
    assert enqueuer.layout.blob_path(first.id).read_bytes() == b"first"
    assert read_manifest(enqueuer.layout, first.id) == first
    assert_spool_integrity(enqueuer.layout)


def test_id_collision_on_manifest_keeps_the_stranger(blob_enqueuer: Enqueuer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest whose blob is gone (evicted) must not be overwritten, nor adopt our bytes."""
    enqueuer = blob_enqueuer
    stray = put(enqueuer, b"evicted")
    enqueuer.layout.blob_path(stray.id).unlink()
    stray_bytes = enqueuer.layout.manifest_path(stray.id).read_bytes()
    fresh = new_id()
    ids = iter([stray.id, fresh])
    monkeypatch.setattr(enqueue_module, "new_id", lambda: next(ids))
    entry = put(enqueuer, b"new bytes", "b.bin")
    assert entry.id == fresh
    assert enqueuer.layout.manifest_path(stray.id).read_bytes() == stray_bytes
    assert not enqueuer.layout.blob_path(stray.id).exists()
    assert enqueuer.layout.blob_path(fresh).read_bytes() == b"new bytes"
    assert os.listdir(enqueuer.layout.tmp_dir) == []


def test_small_save_is_one_inline_manifest(enqueuer: Enqueuer) -> None:
    data = os.urandom(1000)
    manifest = put(enqueuer, data, "m.json", metadata={"step": 1})
    layout = enqueuer.layout
    assert manifest.format == INLINE_FORMAT_VERSION and manifest.payload == data and manifest.inline
    assert read_manifest(layout, manifest.id) == manifest
    assert (manifest.size, manifest.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert os.listdir(layout.blobs_dir) == [] and os.listdir(layout.tmp_dir) == []
    assert os.listdir(layout.manifests_dir) == [layout.manifest_path(manifest.id).name]
    with open_spooled(layout, manifest.id) as spooled:
        assert spooled.read() == data
    assert_spool_integrity(layout)


def test_inline_limit_and_what_is_never_inline(tmp_path: Path) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", inline_max=100))
    assert put(enqueuer, b"x" * 100).inline
    assert not put(enqueuer, b"x" * 101).inline  # above the setting: a blob
    assert not put(enqueuer, b"x", "u.bin", kind="upload").inline  # copied from a file: a blob
    unknown_size = enqueuer.enqueue(spec("s.bin"), lambda sink: sink.write(b"y" * 10))
    assert not unknown_size.inline
    # announced small, wrote more: written again through the blob path, whole
    grew = enqueuer.enqueue(spec("g.bin"), lambda sink: sink.write(b"z" * 500), expected_size=10)
    assert not grew.inline and enqueuer.layout.blob_path(grew.id).read_bytes() == b"z" * 500
    quota = Enqueuer(make_settings(tmp_path / "spool2", spool_quota="1MiB"))
    assert not put(quota, b"q").inline  # the quota counts blobs/: with one, every entry is a blob
    assert_spool_integrity(enqueuer.layout)
    assert_spool_integrity(quota.layout)


def test_inline_id_collision_keeps_the_stranger(enqueuer: Enqueuer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An inline save whose id is taken (by a blob entry or an inline one) never overwrites it."""
    layout = enqueuer.layout
    blob_entry = put(Enqueuer(enqueuer.settings.replace(inline_max=0)), b"blob entry", "b.bin")
    inline_entry = put(enqueuer, b"inline entry", "i.bin")
    before = {i: layout.manifest_path(i).read_bytes() for i in (blob_entry.id, inline_entry.id)}
    fresh = new_id()
    ids = iter([blob_entry.id, inline_entry.id, fresh])
    monkeypatch.setattr(enqueue_module, "new_id", lambda: next(ids))
    entry = put(enqueuer, b"new bytes", "n.bin")
    assert entry.id == fresh and entry.inline
    assert {i: layout.manifest_path(i).read_bytes() for i in before} == before
    assert layout.blob_path(blob_entry.id).read_bytes() == b"blob entry"
    assert read_manifest(layout, fresh).payload == b"new bytes"
    assert os.listdir(layout.tmp_dir) == []
    assert_spool_integrity(layout)


def test_failing_serializer_of_a_small_save_leaves_nothing(enqueuer: Enqueuer) -> None:
    def write(sink):
        sink.write(b"x" * 10)
        raise RuntimeError("serializer exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        enqueuer.enqueue(spec(), write, expected_size=10)
    _nothing_written(enqueuer.layout)


def test_without_unnamed_files_manifests_go_through_named_temp_files(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where O_TMPFILE or /proc is missing, a named temp manifest is linked into place, then unlinked."""
    monkeypatch.setattr(newfile._Support, "unnamed", False)
    linked: list[str] = []
    real_link = os.link
    monkeypatch.setattr(os, "link", lambda src, dst, **kw: (linked.append(os.fspath(src)), real_link(src, dst, **kw)))
    enqueuer = Enqueuer(make_settings(tmp_path / "spool"))
    small, big = put(enqueuer, b"small", "s.bin"), put(enqueuer, os.urandom(100_000), "b.bin")
    assert small.inline and not big.inline
    assert [os.path.basename(path).split("-", 1)[1] for path in linked] == [
        f"{small.id}.manifest.part", f"{big.id}.blob.part", f"{big.id}.manifest.part"]
    assert os.listdir(enqueuer.layout.tmp_dir) == []
    assert_spool_integrity(enqueuer.layout, acknowledged={m.id: Ack(m.id, m.size, m.sha256) for m in (small, big)})


def test_threads_of_one_process_enqueue_concurrently(enqueuer: Enqueuer) -> None:
    results: list[Manifest] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(50):
            manifest = put(enqueuer, os.urandom(100 + i * 5000), f"t{n}-{i}.bin")
            with lock:
                results.append(manifest)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({m.id for m in results}) == 200
    assert manifest_ids(enqueuer.layout) == {m.id for m in results}
    assert_spool_integrity(enqueuer.layout)


def test_power_durability_fsyncs_files_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    enqueuer = Enqueuer(make_settings(tmp_path / "spool", durability="power", inline_max=0))
    monkeypatch.setattr(os, "fsync", fsync)
    manifest = put(enqueuer, b"precious")
    layout = enqueuer.layout
    # The blob's data, the manifest's data (an unnamed file in tmp/, or a named .manifest.part where
    # O_TMPFILE is unavailable) and the blobs/ directory are on disk before the commit point; the
    # manifests/ directory right after it (before enqueue returns).
    tmp_files = [path for path in synced if path.startswith(str(layout.tmp_dir) + "/")]
    assert any(".blob.part" in path for path in tmp_files)
    assert any(".blob.part" not in path for path in tmp_files), f"manifest data not fsynced: {synced}"
    assert str(layout.blobs_dir) in synced and synced[-1] == str(layout.manifests_dir)
    synced.clear()
    inline = Enqueuer(make_settings(tmp_path / "spool3", durability="power"))
    assert put(inline, b"small and precious").inline
    # an inline entry: its one file's data before the commit point, manifests/ right after it
    assert len(synced) == 2 and synced[0].startswith(str(inline.layout.tmp_dir) + "/")
    assert synced[1] == str(inline.layout.manifests_dir)
    synced.clear()
    Enqueuer(make_settings(tmp_path / "spool2"))  # default "process" durability: no fsync on the hot path
    put(Enqueuer(make_settings(tmp_path / "spool2")), b"cheap")
    assert synced == []
    assert manifest.size == 8


def test_unknown_layout_marker_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    (root / "SPOOL").write_text("mldash-spool 2\n")
    with pytest.raises(SpoolCorruptError, match=r"layout 'mldash-spool 2'; this mldash reads 'mldash-spool 1'"):
        Enqueuer(make_settings(root))


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_every_spool_file_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        root = tmp_path / "spool"
        enqueuer = Enqueuer(make_settings(root, spool_quota="1MiB"))  # quota: creates quota.lock
        put(enqueuer, b"x" * 1000)
        index = SpoolIndex(enqueuer.layout)
        lock = DaemonLock(enqueuer.layout).acquire()
        try:
            ingest_new(index, enqueuer.layout, set())
            checked = assert_private_modes(root)
        finally:
            lock.release()
            index.close()
    finally:
        os.umask(old)
    for name in ("SPOOL", "quota.lock", "daemon.lock", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm",
                 "tmp", "blobs", "manifests"):
        assert name in checked, f"{name} was not created, so its mode was not checked"
    assert any(path.startswith("blobs/") for path in checked) and any(p.startswith("manifests/") for p in checked)


def test_spool_marker_creation_survives_a_concurrent_debris_clean_up(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes create one spool at the same moment and one of them has already started a daemon, whose
    clean-up of tmp/ runs while the other writes the SPOOL marker's temp file. Seen from another PID namespace
    (a container), the pid in the temp name is dead: only the writer's lock protects it."""
    import mldash.spool.layout as layout_module
    import mldash.spool.recovery as recovery

    monkeypatch.setattr(recovery, "_pid_alive", lambda pid: False)
    root = tmp_path / "spool"
    removed: list[list[str]] = []

    def clean_up() -> None:
        report = recovery.RecoveryReport()
        recovery.clean_debris(SpoolLayout(root), report)
        removed.append(report.removed_tmp)

    real_open, real_hold = layout_module.open_private, layout_module.hold

    def open_then_clean_up(path, *args, **kwargs):  # the unlucky moment: created, not locked yet
        fd = real_open(path, *args, **kwargs)
        if str(path).endswith("SPOOL.part") and not removed:
            clean_up()
        return fd

    def hold_then_clean_up(fd: int) -> bool:  # any later moment: locked
        held = real_hold(fd)
        if held:
            clean_up()
        return held

    monkeypatch.setattr(layout_module, "open_private", open_then_clean_up)
    monkeypatch.setattr(layout_module, "hold", hold_then_clean_up)
    layout = SpoolLayout(root).ensure()
    assert (root / "SPOOL").read_text() == "mldash-spool 1\n"
    assert len(removed) == 2 and len(removed[0]) == 1 and removed[1] == [], removed
    assert os.listdir(layout.tmp_dir) == []
