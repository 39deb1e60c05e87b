"""Bad input on the daemon side: corrupt manifests, missing bytes, an index that disagrees, debris, reindex.

Every problem must end as a quarantined row with a readable reason (`last_error`) and an event, while
the good entries around it are still ingested and claimable: one bad file never blocks the queue.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from mldash.spool.enqueue import Enqueuer
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.manifest import MAX_MANIFEST_BYTES, Manifest
from mldash.spool.recovery import (
    ORPHAN_BLOB_GRACE,
    STALE_TMP_AGE,
    RecoveryReport,
    clean_debris,
    rebuild,
    recover,
)
from mldash.spool.states import State
from tests.spool_helpers import assert_spool_integrity, make_settings, put

OWNER = "test-daemon"


@pytest.fixture
def enqueuer(tmp_path: Path) -> Enqueuer:
    """Entries with blobs, however small (inline_max=0): most tests here are about blobs going wrong."""
    return Enqueuer(make_settings(tmp_path / "spool", inline_max=0))


@pytest.fixture
def inline_enqueuer(tmp_path: Path) -> Enqueuer:
    return Enqueuer(make_settings(tmp_path / "spool"))


def _fake_id(layout: SpoolLayout) -> int:
    """An id for a hand-made entry, taken from a real enqueue (then removed) so it is realistic."""
    manifest = put(Enqueuer(make_settings(layout.root, inline_max=0)), b"")
    layout.manifest_path(manifest.id).unlink()
    layout.blob_path(manifest.id).unlink()
    return manifest.id


def _write_entry(layout: SpoolLayout, file_id: int, manifest_bytes: bytes, blob: bytes | None = b"data") -> None:
    layout.manifest_path(file_id).write_bytes(manifest_bytes)
    if blob is not None:
        layout.blob_path(file_id).write_bytes(blob)


def _good_manifest(file_id: int, blob: bytes = b"data", **changes: object) -> Manifest:
    import hashlib

    fields: dict[str, object] = dict(id=file_id, namespace="ns", project="p", experiment="e", prefix="",
                                     filename="f.bin", size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                                     content_type="application/octet-stream", created_at=time.time())
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def _raw(manifest: Manifest, **changes: object) -> bytes:
    return msgpack.packb({**dataclasses.asdict(manifest), **changes}, use_bin_type=True)


def _recover(layout: SpoolLayout, **kwargs: object) -> tuple[SpoolIndex, RecoveryReport]:
    index = SpoolIndex(layout)
    return index, recover(index, layout, OWNER, **kwargs)  # type: ignore[arg-type]


def _assert_quarantined(index: SpoolIndex, file_id: int, reason: str) -> None:
    row = index.get(file_id)
    assert row is not None, f"{file_id} is not in the index at all: silently dropped"
    assert row["state"] == State.QUARANTINED, f"{file_id} is {row['state']}, expected quarantined ({reason})"
    assert reason in (row["last_error"] or ""), f"{file_id}: last_error {row['last_error']!r} lacks {reason!r}"
    events = [e for e in index.recent_events(limit=1000) if e["entry_id"] == file_id]
    assert any(e["level"] == "error" and reason in e["message"] for e in events), f"no error event for {file_id}"


def test_bad_manifests_are_quarantined_and_the_rest_still_flows(enqueuer: Enqueuer) -> None:
    layout = enqueuer.layout
    good = [put(enqueuer, os.urandom(100 + i), f"good{i}.bin") for i in range(3)]
    cases: dict[int, str] = {}

    def case(reason: str, manifest_bytes: bytes, blob: bytes | None = b"data", file_id: int | None = None) -> None:
        file_id = file_id or _fake_id(layout)
        _write_entry(layout, file_id, manifest_bytes, blob)
        cases[file_id] = reason

    some = _fake_id(layout)
    valid = _good_manifest(some).encode()
    case("not a valid msgpack manifest", valid[: len(valid) // 2], file_id=some)          # truncated
    case("not a valid msgpack manifest", b"\xc1 this is not msgpack")                      # garbage
    case("manifest is a list, expected a map", msgpack.packb([1, 2, 3]))
    other = _fake_id(layout)
    case("unknown manifest format 99", _raw(_good_manifest(other), format=99), file_id=other)
    other = _fake_id(layout)
    case("unknown manifest format None", _raw(_good_manifest(other), format=None), file_id=other)
    other, stranger = _fake_id(layout), _fake_id(layout)
    case(f"holds id {stranger}, not {other}", _good_manifest(stranger).encode(), file_id=other)
    other = _fake_id(layout)
    case(f"blob {other} is missing", _good_manifest(other).encode(), blob=None, file_id=other)
    other = _fake_id(layout)
    case(f"blob {other}: 9 bytes, manifest says 4", _good_manifest(other).encode(), blob=b"123456789",
         file_id=other)
    other = _fake_id(layout)
    case("path escape", _good_manifest(other, filename="..").encode(), file_id=other)
    other = _fake_id(layout)
    case("manifest field size is invalid", _raw(_good_manifest(other), size="4"), file_id=other)
    other = _fake_id(layout)
    case("missing fields", msgpack.packb({"format": 1, "id": other}), file_id=other)
    other = _fake_id(layout)
    case("manifest field created_at is invalid", _raw(_good_manifest(other), created_at=2**64 - 1), file_id=other)
    other = _fake_id(layout)
    case("manifest field created_at is invalid", _raw(_good_manifest(other), created_at="yesterday"), file_id=other)
    other = _fake_id(layout)
    case("manifest field description is invalid", _raw(_good_manifest(other), description=7), file_id=other)
    other = _fake_id(layout)
    case("manifest field metadata is invalid", _raw(_good_manifest(other), metadata={"k": b"\x00bytes"}),
         file_id=other)
    other = _fake_id(layout)
    case("too large for a manifest", b"\x00" * (MAX_MANIFEST_BYTES + 1), file_id=other)
    other = _fake_id(layout)
    _write_entry(layout, other, _good_manifest(other, blob=b"x" * 5).encode(), blob=None)
    (layout.tmp_dir.parent / "outside").write_bytes(b"y" * 5)
    layout.blob_path(other).symlink_to(layout.tmp_dir.parent / "outside")  # same size, outside the spool
    cases[other] = f"blob {other} is not a regular file"
    other = _fake_id(layout)
    _write_entry(layout, other, _good_manifest(other).encode(), blob=None)
    layout.blob_path(other).symlink_to(layout.blob_path(other))  # ELOOP
    cases[other] = f"blob {other} is not a regular file"
    other = _fake_id(layout)
    layout.manifest_path(other).mkdir()  # a directory where a manifest should be
    layout.blob_path(other).write_bytes(b"data")
    cases[other] = "cannot be read"

    index, report = _recover(layout)
    try:
        for file_id, reason in cases.items():
            _assert_quarantined(index, file_id, reason)
        assert set(report.quarantined) <= set(cases)
        for manifest in good:
            assert index.get(manifest.id)["state"] == State.QUEUED
        claimed = index.claim(OWNER, lease_seconds=60, limit=100)
        assert {row["id"] for row in claimed} == {m.id for m in good}, "the bad entries blocked the queue"
        assert index.counts()["quarantined"]["count"] == len(cases)
        # A second start-up changes nothing and does not crash on the same files.
        again = recover(index, layout, OWNER)
        assert again.ingested == 0 and not again.quarantined
    finally:
        index.close()


def test_hostile_names_in_manifests_do_not_crash_the_daemon(enqueuer: Enqueuer) -> None:
    layout = enqueuer.layout
    good = put(enqueuer, b"fine")
    for name in ("².msgpack", "٣.msgpack", "99999999999999999999999999.msgpack", "9223372036854775808.msgpack",
                 "007.msgpack", "x.msgpack", ".msgpack", "12.msgpack.part", "README"):
        (layout.manifests_dir / name).write_bytes(b"junk")
    for name in ("²", "٣", "99999999999999999999999999", "x"):
        (layout.blobs_dir / name).write_bytes(b"junk")
    (layout.tmp_dir / "²-1.blob.part").write_bytes(b"junk")
    index, report = _recover(layout, now=time.time() + ORPHAN_BLOB_GRACE + 1)
    try:
        assert index.get(good.id)["state"] == State.QUEUED
        assert {row["id"] for row in index.rows()} == {good.id}, "a non-manifest file name became an entry"
        assert os.listdir(layout.tmp_dir) == []
        assert report.removed_orphan_blobs == []  # not ours to delete: not an id
    finally:
        index.close()


def test_index_rows_whose_files_disappeared_are_quarantined(enqueuer: Enqueuer) -> None:
    layout = enqueuer.layout
    lost_manifest, lost_blob, fine = (put(enqueuer, b"x" * n, f"{n}.bin") for n in (10, 20, 30))
    index, _ = _recover(layout)
    index.close()
    layout.manifest_path(lost_manifest.id).unlink()
    layout.blob_path(lost_blob.id).unlink()
    # Far past the orphan grace: the blob whose manifest vanished is still an entry the index knows.
    index, report = _recover(layout, now=time.time() + 10 * ORPHAN_BLOB_GRACE)
    try:
        _assert_quarantined(index, lost_manifest.id, "manifest disappeared")
        _assert_quarantined(index, lost_blob.id, f"blob {lost_blob.id} disappeared")
        assert sorted(report.quarantined) == sorted([lost_manifest.id, lost_blob.id])
        assert layout.blob_path(lost_manifest.id).exists(), "the bytes of a quarantined entry were deleted"
        assert index.get(fine.id)["state"] == State.QUEUED
        assert [row["id"] for row in index.claim(OWNER, 60, 10)] == [fine.id]
    finally:
        index.close()


def test_inline_entries_are_ingested_reconciled_and_rebuilt(inline_enqueuer: Enqueuer) -> None:
    """Format-2 entries have no blob: that is not a loss, at start-up, in reconcile or in a reindex."""
    layout = inline_enqueuer.layout
    inline = [put(inline_enqueuer, os.urandom(10 + i), f"i{i}.bin") for i in range(3)]
    blob = put(inline_enqueuer, os.urandom(100_000), "big.bin")
    assert all(m.inline for m in inline) and not blob.inline
    index, report = _recover(layout)
    try:
        assert report.ingested == 4 and not report.quarantined
        assert {row["id"]: row["state"] for row in index.rows()} == {m.id: State.QUEUED for m in [*inline, blob]}
        assert_spool_integrity(layout, index)
    finally:
        index.close()
    layout.manifest_path(inline[0].id).unlink()  # a pending inline entry loses its only file
    index, report = _recover(layout, now=time.time() + 10 * ORPHAN_BLOB_GRACE)
    try:
        assert report.quarantined == [inline[0].id]  # the others, without blobs too, are fine
        _assert_quarantined(index, inline[0].id, "manifest disappeared")
        assert {row["id"] for row in index.claim(OWNER, 60, 10)} == {m.id for m in [*inline[1:], blob]}
    finally:
        index.close()
    report = rebuild(layout)
    assert report.ingested == 3 and not report.removed_orphan_blobs
    index = SpoolIndex(layout)
    try:
        assert all(row["state"] == State.QUEUED for row in index.rows())
        assert_spool_integrity(layout, index)
    finally:
        index.close()


def test_inline_manifests_are_checked_like_the_rest(enqueuer: Enqueuer) -> None:
    layout = enqueuer.layout
    cases: dict[int, str] = {}

    def case(reason: str, file_id: int, manifest_bytes: bytes) -> None:
        _write_entry(layout, file_id, manifest_bytes, blob=None)
        cases[file_id] = reason

    def inline(file_id: int, payload: bytes = b"data", **changes: object) -> bytes:
        return _raw(_good_manifest(file_id, payload, format=2, payload=payload), **changes)

    some = _fake_id(layout)
    _write_entry(layout, some, inline(some), blob=None)
    other = _fake_id(layout)
    case("manifest format 2 without its payload", other, _raw(_good_manifest(other), format=2))
    third = _fake_id(layout)
    case("manifest field payload is invalid", third, inline(third, size=5))  # payload shorter than size
    fourth = _fake_id(layout)
    as_str = inline(fourth).replace(b"\xc4\x04data", b"\xa4data")  # the payload as a msgpack str, not bin
    case("manifest field payload is invalid", fourth, as_str)
    fifth = _fake_id(layout)
    # A format-1 manifest's bytes are in blobs/, whatever else it holds: a `payload` key is ignored.
    case(f"blob {fifth} is missing", fifth, _raw(_good_manifest(fifth), payload=b"data"))
    sixth = _fake_id(layout)
    case("unknown manifest format 3", sixth, inline(sixth, format=3))
    index, report = _recover(layout)
    try:
        for file_id, reason in cases.items():
            _assert_quarantined(index, file_id, reason)
        assert index.get(some)["state"] == State.QUEUED
        assert sorted(report.quarantined) == [] and report.ingested == len(cases) + 1
    finally:
        index.close()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_debris_rules(enqueuer: Enqueuer) -> None:
    layout = enqueuer.layout
    entry = put(enqueuer, b"keep me")
    dead = _dead_pid()
    tmp = layout.tmp_dir
    for name in (f"{dead}-1.blob.part", f"{dead}-1.manifest.part", "no-pid.part", f"{os.getpid()}-2.blob.part"):
        (tmp / name).write_bytes(b"x")
    orphan = layout.blob_path(entry.id + 1)
    orphan.write_bytes(b"orphan")

    report = RecoveryReport()
    clean_debris(layout, report)
    assert sorted(os.listdir(tmp)) == [f"{os.getpid()}-2.blob.part"], "a live writer's temp file was removed"
    assert orphan.exists(), "a young orphan may be a writer between its two links: it must be kept"
    assert sorted(report.removed_tmp) == sorted([f"{dead}-1.blob.part", f"{dead}-1.manifest.part", "no-pid.part"])

    report = RecoveryReport()
    clean_debris(layout, report, now=time.time() + ORPHAN_BLOB_GRACE + 1)
    assert report.removed_orphan_blobs == [entry.id + 1] and not orphan.exists()
    assert os.listdir(tmp) == [f"{os.getpid()}-2.blob.part"]

    clean_debris(layout, RecoveryReport(), now=time.time() + STALE_TMP_AGE + 1)
    assert os.listdir(tmp) == [], "a temp file older than a day is debris even if its pid exists again"
    assert_spool_integrity(layout)


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_locked_temp_file_is_kept_whatever_its_pid_says(enqueuer: Enqueuer) -> None:
    """A writer in another PID namespace (a container, another host on a shared spool) names its temp file
    with a pid that is dead here: its lock, not the pid, says it is alive."""
    layout = enqueuer.layout
    path = layout.tmp_dir / f"{_dead_pid()}-7.blob.part"
    path.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for now in (None, time.time() + STALE_TMP_AGE + 1):  # not even a day-old locked file is debris
            report = RecoveryReport()
            clean_debris(layout, report, now=now)
            assert path.exists() and report.removed_tmp == [], "a live writer's temp file was removed"
    finally:
        holder.communicate("")  # the writer ends: its lock goes with it
    report = RecoveryReport()
    clean_debris(layout, report)
    assert report.removed_tmp == [path.name] and not path.exists()


def test_a_temp_file_removed_before_its_writer_locked_it_is_written_again(enqueuer: Enqueuer) -> None:
    """The window between a writer's create and its lock: a clean-up that judged the file debris holds the
    lock while it unlinks; the writer's hold() waits for it, sees the file unlinked and says so."""
    import threading

    from mldash.spool.tmp_owner import Writer, hold, writer_of

    path = enqueuer.layout.tmp_dir / f"{_dead_pid()}-8.blob.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer, probe = writer_of(path)
        assert writer is Writer.GONE and probe is not None
        held: list[bool] = []
        thread = threading.Thread(target=lambda: held.append(hold(fd)))
        thread.start()
        thread.join(0.2)
        assert thread.is_alive(), "hold() must wait for the clean-up's lock, not go on unlocked"
        path.unlink()
        os.close(probe)
        thread.join(10)
        assert held == [False]
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert hold(fd) is True and writer_of(path)[0] is Writer.ALIVE
    finally:
        os.close(fd)


_NAMESPACED_WRITER = """
import sys
from pathlib import Path
from mldash.spool.enqueue import Enqueuer
from tests.spool_helpers import make_settings, spec

def write(sink):
    sink.write(b"a" * 100_000)
    print("writing", flush=True)
    sys.stdin.readline()  # the test runs the daemon's recovery meanwhile
    sink.write(b"b" * 100_000)

manifest = Enqueuer(make_settings(Path(sys.argv[1]), inline_max=0)).enqueue(spec("ckpt.bin"), write)
print(manifest.id, flush=True)
"""


def _free_pid() -> int:
    for pid in range(30000, 20000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free pid")


def test_a_save_in_another_pid_namespace_survives_the_daemons_recovery(enqueuer: Enqueuer) -> None:
    """End to end, as with a training job in a container and the daemon outside it: the writer's pid (set
    through ns_last_pid in its own namespace) is dead here, and the daemon's start-up runs mid-save."""
    layout = enqueuer.layout
    pid = _free_pid()
    command = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
               f'echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "$0" -c "$1" "$2"',
               sys.executable, _NAMESPACED_WRITER, str(layout.root)]
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unshare with PID namespaces (root, or user namespaces enabled)")
    writer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert writer.stdout.readline() == "writing\n", writer.stderr.read()
        assert [name.split("-")[0] for name in os.listdir(layout.tmp_dir)] == [str(pid)]
        index, report = _recover(layout)  # the daemon's start-up, in this (the parent) namespace
        index.close()
        assert report.removed_tmp == [], "the daemon removed the temp file of a save in progress"
        out, err = writer.communicate("go\n", timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err
    manifest_id = int(out.strip())
    assert layout.blob_path(manifest_id).read_bytes() == b"a" * 100_000 + b"b" * 100_000
    assert os.listdir(layout.tmp_dir) == []
    assert_spool_integrity(layout)


def test_rebuild_recreates_the_index_from_manifests(enqueuer: Enqueuer) -> None:
    layout = enqueuer.layout
    entries = [put(enqueuer, os.urandom(50), f"{i}.bin") for i in range(5)]
    index, _ = _recover(layout)
    index.claim(OWNER, 60, 2)
    index.transition(entries[0].id, State.UPLOADED)
    index.transition(entries[0].id, State.COMMITTED)
    index.transition(entries[1].id, State.FAILED, last_error="boom")
    index.close()
    broken = _fake_id(layout)
    _write_entry(layout, broken, b"\xc1")
    (layout.tmp_dir / f"{_dead_pid()}-9.blob.part").write_bytes(b"x")
    layout.index_path.write_bytes(b"this is not a database")  # even a destroyed index is rebuilt

    report = rebuild(layout)
    assert report.ingested == 6 and report.removed_tmp
    index = SpoolIndex(layout)
    try:
        rows = {row["id"]: row for row in index.rows()}
        assert set(rows) == {m.id for m in entries} | {broken}
        # Manifests are the only truth: every entry is queued again (re-sending is idempotent).
        assert all(rows[m.id]["state"] == State.QUEUED and rows[m.id]["attempts"] == 0 for m in entries)
        _assert_quarantined(index, broken, "not a valid msgpack manifest")
        assert_spool_integrity(layout, index, allow_quarantined=True)
    finally:
        index.close()


def test_copied_spool_is_drained_elsewhere_and_holds_no_path(tmp_path: Path) -> None:
    origin = tmp_path / "host-a" / "deep" / "spool"
    enqueuer = Enqueuer(make_settings(origin))
    entries = [put(enqueuer, os.urandom(1000 * i), f"{i}.bin", metadata={"i": i}) for i in range(1, 6)]
    index, _ = _recover(enqueuer.layout)
    index.claim(OWNER, 60, 2)  # in flight when the disk is copied
    index.close()

    copy = tmp_path / "host-b" / "spool"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(origin), str(copy)], check=True)
    layout = SpoolLayout(copy).ensure()
    rebuild(layout)
    index = SpoolIndex(layout)
    try:
        rows = index.rows()
        assert {row["id"] for row in rows} == {m.id for m in entries}
        assert {row["state"] for row in rows} == {State.QUEUED}
        assert_spool_integrity(layout, index)
    finally:
        index.close()
    for root in (origin, copy):
        for path in root.rglob("*"):
            if path.is_file() and path.parent.name != "blobs":
                data = path.read_bytes()
                for needle in (str(origin), str(copy), str(tmp_path), "host-a"):
                    assert needle.encode() not in data, f"{path} holds the absolute path {needle}"


def test_rebuild_of_an_empty_or_missing_spool_dir(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path / "spool").ensure()
    assert rebuild(layout).ingested == 0
    shutil.rmtree(layout.tmp_dir)
    layout.ensure()  # a lost directory is recreated, not fatal
    assert rebuild(layout).ingested == 0
