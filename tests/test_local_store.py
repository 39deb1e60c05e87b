"""LocalStore behaviour beyond the shared contract: containment, permissions, layout, crash leftovers."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
import time
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.store import (
    LocalStore,
    NoSuchUploadError,
    ObjectExistsError,
    PermanentStoreError,
    TransientStoreError,
    b64_sha256,
    make_store,
)

MiB = 2**20
KEY = "files/ns/proj/exp/ckpt/1/model.pt"


@pytest.fixture
async def store(tmp_path: Path) -> LocalStore:
    local = LocalStore(tmp_path / "store")
    await local.open()
    return local


def visible_tree(root: Path) -> list[str]:
    """Every file under root outside the store's own dot-directories, as keys."""
    found = []
    for directory, dirs, files in os.walk(root):
        if Path(directory) == root:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files = [f for f in files if not f.startswith(".")]
        found += [str((Path(directory) / f).relative_to(root)) for f in files]
    return sorted(found)


async def test_make_store_builds_a_local_store(settings: Settings, tmp_path: Path) -> None:
    store = make_store(settings)
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "store" and store.fsync is False
    assert store.key(KEY) == KEY
    power = make_store(settings.replace(durability="power"))
    assert isinstance(power, LocalStore) and power.fsync is True


async def test_power_durability_store_works(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=True)
    await store.put(KEY, b"data", b64_sha256(b"data"))
    upload_id = await store.create_multipart(KEY + ".mp")
    receipt = await store.upload_part(KEY + ".mp", upload_id, 1, b"part", b64_sha256(b"part"))
    await store.complete_multipart(KEY + ".mp", upload_id, [receipt])
    await store.download(KEY, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"data"


@pytest.mark.parametrize("key", [
    "../escape", "/etc/passwd", "files/../../escape", "files/a/../../../escape", "files//double", "files/./x",
    ".meta/files/x", ".uploads/x", ".tmp/x", ".lock", "", "files/nul\x00byte", "files/x/" + "k" * 1100,
    "files/surrogate\udc80",
])
async def test_keys_that_escape_or_collide_are_refused(store: LocalStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(PermanentStoreError):
        await store.put(key, b"x", b64_sha256(b"x"))
    with pytest.raises(PermanentStoreError):
        await store.create_multipart(key)
    with pytest.raises(PermanentStoreError):
        await store.head(key)
    assert not (tmp_path / "escape").exists()


async def test_symlink_out_of_the_root_is_refused(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "files").mkdir()
    (store.root / "files" / "link").symlink_to(outside)
    with pytest.raises(PermanentStoreError):
        await store.put("files/link/model.pt", b"x", b64_sha256(b"x"))
    assert list(outside.iterdir()) == []


async def test_visible_tree_is_exactly_the_keys(store: LocalStore) -> None:
    keys = [KEY, "files/ns/proj/exp/2/other.bin", "root/files/a/b/c/3/x"]
    for key in keys:
        await store.put(key, key.encode(), b64_sha256(key.encode()))
    big = "files/ns/proj/exp/ckpt/4/big.bin"
    upload_id = await store.create_multipart(big)
    receipts = [await store.upload_part(big, upload_id, n, d, b64_sha256(d))
                for n, d in ((1, b"a" * (5 * MiB)), (2, b"b"))]
    await store.complete_multipart(big, upload_id, receipts)
    pending = "files/ns/proj/exp/ckpt/5/pending.bin"
    await store.create_multipart(pending)

    assert visible_tree(store.root) == sorted([*keys, big])
    assert os.listdir(store.root / ".tmp") == []  # nothing left behind by puts and completes


async def test_files_0600_and_directories_0700(store: LocalStore) -> None:
    old = os.umask(0o022)
    try:
        await store.put(KEY, b"secret", b64_sha256(b"secret"))
        upload_id = await store.create_multipart(KEY + ".mp")
        await store.upload_part(KEY + ".mp", upload_id, 1, b"part", b64_sha256(b"part"))
    finally:
        os.umask(old)
    for directory, dirs, files in os.walk(store.root):
        for name in dirs:
            assert stat.S_IMODE((Path(directory) / name).stat().st_mode) == 0o700, name
        for name in files:
            assert stat.S_IMODE((Path(directory) / name).stat().st_mode) == 0o600, name


async def test_part_checksum_is_computed_not_echoed(store: LocalStore) -> None:
    upload_id = await store.create_multipart(KEY)
    data = b"p" * 1000
    with pytest.raises(TransientStoreError) as caught:
        await store.upload_part(KEY, upload_id, 1, data, b64_sha256(b"other bytes"))
    assert caught.value.code == "BadDigest"
    assert await store.list_parts(KEY, upload_id) == {}  # the refused part was not kept

    receipt = await store.upload_part(KEY, upload_id, 1, data, b64_sha256(data))
    assert receipt.checksum_sha256 == b64_sha256(data)
    listed = await store.list_parts(KEY, upload_id)
    assert listed[1].checksum_sha256 == b64_sha256(data) and listed[1].size == 1000


async def test_upload_id_for_another_key_is_unknown(store: LocalStore) -> None:
    upload_id = await store.create_multipart(KEY)
    with pytest.raises(NoSuchUploadError):
        await store.upload_part("files/other/p/e/1/x", upload_id, 1, b"x", b64_sha256(b"x"))
    with pytest.raises(NoSuchUploadError):
        await store.list_parts(KEY, "../../etc")  # ids are checked before they touch a path


async def test_part_number_out_of_range(store: LocalStore) -> None:
    upload_id = await store.create_multipart(KEY)
    for number in (0, 10_001):
        with pytest.raises(PermanentStoreError):
            await store.upload_part(KEY, upload_id, number, b"x", b64_sha256(b"x"))


async def test_complete_refuses_parts_out_of_order(store: LocalStore) -> None:
    upload_id = await store.create_multipart(KEY)
    first = await store.upload_part(KEY, upload_id, 1, b"a" * (5 * MiB), b64_sha256(b"a" * (5 * MiB)))
    second = await store.upload_part(KEY, upload_id, 2, b"b", b64_sha256(b"b"))
    with pytest.raises(PermanentStoreError) as caught:
        await store.complete_multipart(KEY, upload_id, [second, first])
    assert caught.value.code == "InvalidPartOrder"


async def test_stale_sidecar_from_a_crash_is_harmless(store: LocalStore, tmp_path: Path) -> None:
    """A commit writes the sidecar, then links the object: a crash in between leaves only the sidecar."""
    sidecar = store.root / ".meta" / KEY
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(json.dumps({"size": 3, "sha256": "stale", "etag": None}))
    assert await store.head(KEY) is None

    await store.put(KEY, b"new bytes", b64_sha256(b"new bytes"))
    head = await store.head(KEY)
    assert head is not None and head.checksum_sha256 == b64_sha256(b"new bytes")


async def test_head_without_sidecar_reports_the_bytes(store: LocalStore) -> None:
    """An object copied in by hand (no sidecar) is still reported truthfully, from its bytes."""
    path = store.root / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(b"by hand")
    head = await store.head(KEY)
    assert head is not None and head.size == 7 and head.checksum_sha256 == b64_sha256(b"by hand")
    with pytest.raises(ObjectExistsError):
        await store.put(KEY, b"x", b64_sha256(b"x"))


async def test_delete_prunes_empty_directories(store: LocalStore) -> None:
    await store.put(KEY, b"x", b64_sha256(b"x"))
    await store.put("files/ns/proj/exp/ckpt/2/keep", b"y", b64_sha256(b"y"))
    await store.delete(KEY)
    assert not (store.root / "files/ns/proj/exp/ckpt/1").exists()
    assert not (store.root / ".meta/files/ns/proj/exp/ckpt/1").exists()
    assert (store.root / "files/ns/proj/exp/ckpt/2/keep").read_bytes() == b"y"


async def test_abort_racing_complete_never_leaves_half_an_object(store: LocalStore, tmp_path: Path) -> None:
    """Whichever wins, the key holds either the whole object or nothing, and the upload is gone."""
    parts = [b"a" * (5 * MiB), b"b" * (5 * MiB), b"c"]
    for attempt in range(5):
        key = f"files/ns/proj/exp/race/{attempt}/obj"
        upload_id = await store.create_multipart(key)
        receipts = [await store.upload_part(key, upload_id, n, d, b64_sha256(d)) for n, d in enumerate(parts, 1)]
        results = await asyncio.gather(store.complete_multipart(key, upload_id, receipts),
                                       store.abort_multipart(key, upload_id), return_exceptions=True)
        assert results[0] is not None
        if isinstance(results[0], BaseException):
            assert isinstance(results[0], NoSuchUploadError)
            assert await store.head(key) is None
        else:
            await store.download(key, tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == b"".join(parts)
        assert await store.list_multipart_uploads(key) == []
        assert [n for n in os.listdir(store.root / ".uploads")] == []


async def test_concurrent_puts_of_one_key_create_it_once(store: LocalStore, tmp_path: Path) -> None:
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    results = await asyncio.gather(*(store.put(KEY, p, b64_sha256(p)) for p in payloads), return_exceptions=True)
    winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, ObjectExistsError) for i, r in enumerate(results) if i != winners[0])
    head = await store.head(KEY)
    assert head is not None and head.checksum_sha256 == b64_sha256(payloads[winners[0]])
    await store.download(KEY, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == payloads[winners[0]]


async def test_open_sweeps_debris_of_crashed_calls(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    await store.open()
    live = await store.create_multipart(KEY)
    old_tmp, fresh_tmp = store.root / ".tmp" / "put-old", store.root / ".tmp" / "put-fresh"
    old_tmp.write_bytes(b"x")
    fresh_tmp.write_bytes(b"y")
    day_ago = time.time() - 86400
    os.utime(old_tmp, (day_ago, day_ago))
    dead = store.root / ".uploads" / ".dead-abc-123"
    (dead / "sub").mkdir(parents=True)
    half = store.root / ".uploads" / ".new-0123"
    half.mkdir()
    os.utime(half, (day_ago, day_ago))

    await LocalStore(store.root).open()
    assert sorted(os.listdir(store.root / ".tmp")) == ["put-fresh"]  # a file being written now is kept
    assert sorted(os.listdir(store.root / ".uploads")) == [live]


@pytest.mark.parametrize(("root", "reason"), [("/proc/nope", "No such file or directory"),
                                              ("{tmp}/a-file/store", "Not a directory")])
async def test_a_store_directory_that_cannot_be_created_is_named(tmp_path: Path, root: str, reason: str) -> None:
    """It said "open '' in /proc/nope": an empty key, and neither the setting nor what went wrong in words."""
    (tmp_path / "a-file").write_bytes(b"")
    root = root.format(tmp=tmp_path)
    store = LocalStore(root)
    with pytest.raises(PermanentStoreError) as caught:
        await store.open()
    blocked = "/proc/nope" if root == "/proc/nope" else f"{tmp_path}/a-file/store"
    assert str(caught.value) == (f"store file://{root}: cannot create the directory {blocked}: {reason}; set the "
                                 "store setting (MLDASH_STORE) to a directory this user can create and write")
    assert caught.value.code in ("ENOENT", "ENOTDIR")


async def test_a_call_the_filesystem_never_answers_ends_at_its_deadline(tmp_path: Path) -> None:
    # A hung network mount blocks a thread in the kernel for ever; here the same wait is real: the store's commit
    # lock, held by someone else, blocks its flock(). The call must give up as a transient error (the daemon
    # then backs off and reports the store unreachable), not hang with its lease renewed.
    local = LocalStore(tmp_path / "store", request_timeout=0.3)
    await local.open()
    data = b"weights" * 1000
    holder = os.open(tmp_path / "store" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(TransientStoreError, match=r"put 'files/.*' in .*/store: no answer from the filesystem "
                                                      r"in 0\.3s \(its deadline; a hung network mount"):
            await local.put(KEY, data, b64_sha256(data))
        assert time.monotonic() - started < 5
        assert await local.head(KEY) is None  # a read needs no lock: the store answers it meanwhile
    finally:
        os.close(holder)  # the blocked thread goes on: its put completes now
    # What the late call did is what a retry meets: the object, with our checksum (the daemon adopts it).
    for _ in range(200):
        if (found := await local.head(KEY)) is not None:
            break
        await asyncio.sleep(0.01)
    assert found is not None and found.checksum_sha256 == b64_sha256(data)
    with pytest.raises(ObjectExistsError):
        await local.put(KEY, data, b64_sha256(data))


async def test_a_large_body_gets_time_for_its_size(tmp_path: Path) -> None:
    # The deadline grows with the bytes a call moves (seconds_per_mib), as an S3 body's does: a tight
    # request_timeout does not fail a put that is merely big.
    local = LocalStore(tmp_path / "store", seconds_per_mib=1.0)
    await local.open()
    local.request_timeout = 0.001
    data = os.urandom(64 * MiB)
    assert (await local.put(KEY, data, b64_sha256(data))).size == len(data)


async def test_a_call_past_its_deadline_never_writes_a_refilled_buffer(tmp_path: Path, monkeypatch) -> None:
    """The daemon's part buffers are pooled (mldash_syncd.budget) and the store returns at its deadline while its
    thread goes on. A thread stalled before it wrote (a hung mount creating the temp file) must not write the
    bytes of the next file refilled into that buffer under this key, beside this file's checksum."""
    import threading

    import mldash.store.local as local_module
    from mldash_syncd.budget import ByteBudget

    local = LocalStore(tmp_path / "store", request_timeout=0.3)
    await local.open()
    stalled = threading.Event()
    real_open = local_module.open_private

    def hung_create(path, *args, **kwargs):  # the filesystem stops answering when a temp file is created
        if "/.tmp/" in str(path):
            stalled.wait(30)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(local_module, "open_private", hung_create)
    budget = ByteBudget(4 * MiB)
    first, second = os.urandom(MiB), os.urandom(MiB)
    buffer = await budget.take_buffer(MiB)
    buffer[:] = first
    in_flight = await budget.take_buffer(MiB)  # another upload: the pool keeps given-back buffers for reuse
    with pytest.raises(TransientStoreError, match="no answer from the filesystem"):
        await local.put(KEY, buffer, b64_sha256(first))
    await budget.give_back(buffer)  # what the uploader does in its `finally`
    refill = await budget.take_buffer(MiB)
    assert refill is not buffer  # still read by the late thread: never handed out again
    refill[:] = second
    stalled.set()  # the mount answers; the late put completes
    for _ in range(300):
        if (found := await local.head(KEY)) is not None:
            break
        await asyncio.sleep(0.01)
    assert found is not None and found.checksum_sha256 == b64_sha256(first)
    assert (tmp_path / "store" / KEY).read_bytes() == first
    await budget.give_back(in_flight)


async def test_a_long_clean_up_does_not_fail_the_open(tmp_path: Path, monkeypatch, caplog) -> None:
    """Removing what crashed calls left (a retired upload of 10,000 parts, on a slow filesystem) may outlast the
    deadline: the store opens anyway, says so, and the sweep goes on in its thread."""
    import threading

    release = threading.Event()
    sweep = LocalStore._sweep
    monkeypatch.setattr(LocalStore, "_sweep", lambda self: (release.wait(30), sweep(self)))
    local = LocalStore(tmp_path / "store", request_timeout=0.3)
    try:
        await local.open()
        assert "removing what crashed calls left behind takes longer than 0.3s" in caplog.text
        data = b"still works"
        assert (await local.put(KEY, data, b64_sha256(data))).size == len(data)
    finally:
        release.set()


def test_a_store_that_never_answers_at_start_exits_1_and_does_not_hang(settings: Settings) -> None:
    """A store directory on a hung mount at start: `run --once` exits 1 (not 2, which tells systemd not to restart
    the service) within about its deadline, without waiting at exit for the thread still blocked in the mount."""
    import subprocess
    import sys

    from tests.fixtures.daemon import enqueue_bytes, settings_env

    enqueue_bytes(settings, b"weights", filename="ckpt.pt")
    hung = ("import sys, threading; import mldash.store.local as local; "
            "local.LocalStore._open_layout = lambda self: threading.Event().wait(); "  # a mkdir that never returns
            "from mldash_syncd.cli import main; sys.exit(main(['run', '--once']))")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", hung], env=settings_env(settings.replace(request_timeout=0.5)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "the store is not available: open '' in " in done.stderr and "no answer from the filesystem in 0.5s" \
        in done.stderr, done.stderr
    assert time.monotonic() - started < 20
