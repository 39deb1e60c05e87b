"""The store contract (mldash/store/base.py), one suite run against every store: local directory and S3.

S3 here is moto's server over real HTTP. Where moto and real S3 differ (moto does not validate checksums),
a test asserts only what holds for both, and says so.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.store import (
    LocalStore,
    NoSuchUploadError,
    ObjectExistsError,
    PartReceipt,
    PermanentStoreError,
    Store,
    StoreError,
    TransientStoreError,
    b64_sha256,
    composite_sha256,
    make_store,
)

MiB = 2**20


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Store]:
    """A fresh, open store of each kind, built from settings the way the daemon builds it."""
    chosen = settings if request.param == "local" else request.getfixturevalue("s3_settings")
    async with make_store(chosen.replace(request_timeout=30.0)) as opened:
        yield opened


def key_of(store: Store, name: str = "model.pt", file_id: int = 1) -> str:
    return store.key(f"files/ns/proj/exp/ckpt/{file_id}/{name}")


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating bytes (cheap: one urandom-free pattern per seed)."""
    pattern = bytes((i * 31 + seed * 17 + (i >> 8)) & 0xFF for i in range(4096))
    return (pattern * (size // len(pattern) + 1))[:size]


async def read_back(store: Store, key: str, tmp_path: Path) -> bytes:
    dest = tmp_path / f"download-{os.urandom(4).hex()}"
    await store.download(key, dest)
    return dest.read_bytes()


async def upload_parts(store: Store, key: str, upload_id: str, chunks: list[bytes]) -> list[PartReceipt]:
    return [await store.upload_part(key, upload_id, n, chunk, b64_sha256(chunk))
            for n, chunk in enumerate(chunks, start=1)]


# -- single objects ----------------------------------------------------------------------------------

async def test_put_head_download_roundtrip(store: Store, tmp_path: Path) -> None:
    key, data = key_of(store), blob(100_000)
    stored = await store.put(key, data, b64_sha256(data))
    assert stored.key == key and stored.size == len(data)
    assert stored.checksum_sha256 == b64_sha256(data)

    head = await store.head(key)
    assert head is not None
    assert (head.size, head.checksum_sha256) == (len(data), b64_sha256(data))

    dest = tmp_path / "out" / "model.pt"
    dest.parent.mkdir()
    downloaded = await store.download(key, dest)
    assert dest.read_bytes() == data
    assert downloaded.size == len(data)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.pt"]  # no temp file left behind


async def test_empty_object(store: Store, tmp_path: Path) -> None:
    key = key_of(store, "empty")
    await store.put(key, b"", b64_sha256(b""))
    head = await store.head(key)
    assert head is not None and head.size == 0 and head.checksum_sha256 == b64_sha256(b"")
    assert await read_back(store, key, tmp_path) == b""


async def test_put_never_overwrites(store: Store, tmp_path: Path) -> None:
    key, first, second = key_of(store), blob(5000, seed=1), blob(6000, seed=2)
    await store.put(key, first, b64_sha256(first))
    with pytest.raises(ObjectExistsError) as caught:
        await store.put(key, second, b64_sha256(second))
    assert caught.value.transient is False
    assert await read_back(store, key, tmp_path) == first
    head = await store.head(key)
    assert head is not None and head.checksum_sha256 == b64_sha256(first)


async def test_head_of_missing_is_none(store: Store) -> None:
    assert await store.head(key_of(store, "absent")) is None


async def test_download_of_missing_raises_and_writes_nothing(store: Store, tmp_path: Path) -> None:
    dest_dir = tmp_path / "downloads"
    dest_dir.mkdir()
    with pytest.raises(StoreError):
        await store.download(key_of(store, "absent"), dest_dir / "never")
    assert list(dest_dir.iterdir()) == []


async def test_download_into_a_missing_directory_is_a_store_error(store: Store, tmp_path: Path) -> None:
    await store.put(key_of(store), b"x", b64_sha256(b"x"))
    with pytest.raises(StoreError):
        await store.download(key_of(store), tmp_path / "no" / "such" / "dir" / "out")


async def test_delete_is_idempotent(store: Store) -> None:
    key, data = key_of(store), b"bytes"
    await store.put(key, data, b64_sha256(data))
    await store.delete(key)
    assert await store.head(key) is None
    await store.delete(key)  # absent: not an error
    await store.put(key, data, b64_sha256(data))  # the key is free again
    assert await store.head(key) is not None


async def test_wrong_checksum_is_never_silently_accepted(store: Store) -> None:
    """A body whose checksum does not match never ends up reported as intact.

    LocalStore (and real S3) refuse it: BadDigest, transient (resend). moto does not validate checksums
    and echoes what we sent, so there the check that holds is: the checksum the store reports disagrees
    with the bytes' own, which the daemon's verification compares.
    """
    key, data, other = key_of(store), blob(1000), blob(1000, seed=9)
    try:
        stored = await store.put(key, data, b64_sha256(other))
    except TransientStoreError as exc:
        assert exc.code == "BadDigest"
        assert await store.head(key) is None
    else:
        assert not isinstance(store, LocalStore), "LocalStore must compute the checksum itself"
        head = await store.head(key)
        assert head is not None
        assert b64_sha256(data) not in (stored.checksum_sha256, head.checksum_sha256)


# -- multipart ---------------------------------------------------------------------------------------

async def test_multipart_composite_checksum(store: Store, tmp_path: Path) -> None:
    key = key_of(store, "big.bin")
    chunks = [blob(5 * MiB, seed=1), blob(5 * MiB, seed=2), blob(1234, seed=3)]
    upload_id = await store.create_multipart(key)
    receipts = await upload_parts(store, key, upload_id, chunks)
    assert [(r.part_number, r.size) for r in receipts] == [(1, 5 * MiB), (2, 5 * MiB), (3, 1234)]
    assert all(r.checksum_sha256 in (None, b64_sha256(c)) for r, c in zip(receipts, chunks, strict=True))

    expected = composite_sha256([b64_sha256(c) for c in chunks])
    assert expected.endswith("-3")
    stored = await store.complete_multipart(key, upload_id, receipts)
    assert stored.size == sum(map(len, chunks))

    head = await store.head(key)
    assert head is not None
    assert (head.size, head.checksum_sha256) == (sum(map(len, chunks)), expected)
    assert await read_back(store, key, tmp_path) == b"".join(chunks)
    assert await store.list_multipart_uploads(store.key("files/")) == []


async def test_list_parts_after_partial_upload(store: Store) -> None:
    key = key_of(store, "resume.bin")
    chunks = [blob(5 * MiB, seed=4), blob(5 * MiB, seed=5)]
    upload_id = await store.create_multipart(key)
    receipts = await upload_parts(store, key, upload_id, chunks)

    listed = await store.list_parts(key, upload_id)
    assert sorted(listed) == [1, 2]
    for receipt in receipts:
        have = listed[receipt.part_number]
        assert (have.size, have.etag) == (receipt.size, receipt.etag)
        assert have.checksum_sha256 in (None, receipt.checksum_sha256)  # moto lists no part checksums
    await store.abort_multipart(key, upload_id)


async def test_reuploading_a_part_replaces_it(store: Store, tmp_path: Path) -> None:
    key = key_of(store, "replace.bin")
    first, second, last = blob(5 * MiB, seed=6), blob(5 * MiB + 7, seed=7), blob(10, seed=8)
    upload_id = await store.create_multipart(key)
    old = await store.upload_part(key, upload_id, 1, first, b64_sha256(first))
    new = await store.upload_part(key, upload_id, 1, second, b64_sha256(second))
    assert old.etag != new.etag
    tail = await store.upload_part(key, upload_id, 2, last, b64_sha256(last))

    listed = await store.list_parts(key, upload_id)
    assert (listed[1].size, listed[1].etag) == (len(second), new.etag)

    await store.complete_multipart(key, upload_id, [new, tail])
    assert await read_back(store, key, tmp_path) == second + last
    head = await store.head(key)
    assert head is not None
    assert head.checksum_sha256 == composite_sha256([b64_sha256(second), b64_sha256(last)])


async def test_multipart_accepts_a_memoryview(store: Store, tmp_path: Path) -> None:
    key = key_of(store, "view.bin")
    buffer = bytearray(blob(20_000, seed=3))
    upload_id = await store.create_multipart(key)
    part = memoryview(buffer)[100:10_100]  # a slice: not the whole buffer
    receipt = await store.upload_part(key, upload_id, 1, part, b64_sha256(part))
    await store.complete_multipart(key, upload_id, [receipt])
    assert await read_back(store, key, tmp_path) == bytes(buffer[100:10_100])


async def test_part_buffers_are_let_go_when_the_call_returns(store: Store, tmp_path: Path) -> None:
    """The daemon refills a part buffer (an anonymous mmap) for the next part as soon as no view of it is left
    (mldash_syncd/budget.py): a store that kept one after upload_part/put returned would stall every part."""
    key = key_of(store, "mapped.bin")
    data = blob(6 * MiB, seed=4)
    buffer = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE)
    buffer[:] = data
    upload_id = await store.create_multipart(key)
    receipt = await store.upload_part(key, upload_id, 1, buffer, b64_sha256(data))
    buffer.resize(len(buffer))  # raises BufferError while any view of the buffer is alive
    buffer[:10] = b"x" * 10  # refilled at once, as the daemon does: the upload must not see it
    await store.complete_multipart(key, upload_id, [receipt])
    assert await read_back(store, key, tmp_path) == data

    # Also when the call fails, while its exception (whose traceback holds the call's frames) is still alive.
    with pytest.raises(StoreError) as failed:
        await store.upload_part(key_of(store, "other.bin"), "no-such-upload", 1, buffer, b64_sha256(data))
    assert failed.value is not None
    buffer.resize(len(buffer))

    small = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
    small[:] = data[:4096]
    await store.put(key_of(store, "mapped-small.bin"), small, b64_sha256(data[:4096]))
    small.resize(len(small))
    assert await read_back(store, key_of(store, "mapped-small.bin"), tmp_path) == data[:4096]


async def test_complete_never_overwrites(store: Store, tmp_path: Path) -> None:
    key, original = key_of(store, "taken.bin"), b"the original"
    upload_id = await store.create_multipart(key)
    receipts = await upload_parts(store, key, upload_id, [blob(5 * MiB), b"tail"])
    await store.put(key, original, b64_sha256(original))  # someone got there first

    with pytest.raises(ObjectExistsError):
        await store.complete_multipart(key, upload_id, receipts)
    assert await read_back(store, key, tmp_path) == original
    await store.abort_multipart(key, upload_id)


async def test_aborted_upload_is_gone(store: Store) -> None:
    key = key_of(store, "aborted.bin")
    upload_id = await store.create_multipart(key)
    receipts = await upload_parts(store, key, upload_id, [b"only part"])
    await store.abort_multipart(key, upload_id)

    with pytest.raises(NoSuchUploadError):
        await store.list_parts(key, upload_id)
    with pytest.raises(NoSuchUploadError):
        await store.complete_multipart(key, upload_id, receipts)
    assert await store.head(key) is None
    await store.abort_multipart(key, upload_id)  # aborting again: not an error


async def test_completed_upload_is_gone(store: Store) -> None:
    key = key_of(store, "done.bin")
    upload_id = await store.create_multipart(key)
    receipts = await upload_parts(store, key, upload_id, [b"single"])
    await store.complete_multipart(key, upload_id, receipts)
    with pytest.raises(NoSuchUploadError):
        await store.list_parts(key, upload_id)
    assert await store.list_multipart_uploads(store.key("files/")) == []


async def test_list_multipart_uploads_and_abort(store: Store) -> None:
    first, second, elsewhere = key_of(store, "a.bin"), key_of(store, "b.bin", 2), store.key("files/other/p/e/3/c")
    ids = {key: await store.create_multipart(key) for key in (first, second, elsewhere)}

    pending = await store.list_multipart_uploads(store.key("files/ns/"))
    assert sorted((p.key, p.upload_id) for p in pending) == sorted([(first, ids[first]), (second, ids[second])])

    await store.abort_multipart(first, ids[first])
    pending = await store.list_multipart_uploads(store.key("files/"))
    assert sorted(p.upload_id for p in pending) == sorted([ids[second], ids[elsewhere]])
    for key in (second, elsewhere):
        await store.abort_multipart(key, ids[key])
    assert await store.list_multipart_uploads(store.key("files/")) == []


async def test_small_non_last_part_is_refused(store: Store) -> None:
    key = key_of(store, "small.bin")
    upload_id = await store.create_multipart(key)
    receipts = await upload_parts(store, key, upload_id, [b"too small", b"last"])
    with pytest.raises(PermanentStoreError) as caught:
        await store.complete_multipart(key, upload_id, receipts)
    assert caught.value.code == "EntityTooSmall"
    await store.abort_multipart(key, upload_id)


async def test_unknown_part_etag_is_refused(store: Store) -> None:
    key = key_of(store, "badpart.bin")
    upload_id = await store.create_multipart(key)
    (receipt,) = await upload_parts(store, key, upload_id, [b"data"])
    forged = PartReceipt(part_number=1, size=receipt.size, etag='"00000000000000000000000000000000"',
                         checksum_sha256=None)
    with pytest.raises(PermanentStoreError) as caught:
        await store.complete_multipart(key, upload_id, [forged])
    assert caught.value.code == "InvalidPart"
    assert await store.head(key) is None
    await store.abort_multipart(key, upload_id)
