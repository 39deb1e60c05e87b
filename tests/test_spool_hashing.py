"""The copy-and-hash paths of the spool writer: kernel copy with hash-behind, and the fallbacks."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from mldash.spool.hashing import HashingSink, copy_into

DATA = os.urandom(5 * 2**20 + 12345)


def sink_file(path: Path, flags: int) -> tuple[int, HashingSink]:
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    return fd, HashingSink(fd)


@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_WRONLY], ids=["kernel-copy", "write-only-fallback"])
def test_copy_into_from_a_file_hashes_exactly_the_spooled_bytes(tmp_path: Path, flags: int) -> None:
    source = tmp_path / "src"
    source.write_bytes(DATA)
    fd, sink = sink_file(tmp_path / "dst", flags)
    with open(source, "rb", buffering=0) as handle:
        copy_into(handle, sink, chunk=2**20)  # several chunks, a short last one
    digest = sink.hexdigest()  # before closing: the trailing hasher reads the fd
    sink.close_hasher()
    os.close(fd)
    assert (tmp_path / "dst").read_bytes() == DATA
    assert sink.size == len(DATA)
    assert digest == hashlib.sha256(DATA).hexdigest()


def test_copy_into_starts_at_the_source_position(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(DATA)
    fd, sink = sink_file(tmp_path / "dst", os.O_RDWR)
    with open(source, "rb", buffering=0) as handle:
        handle.seek(1000)
        copy_into(handle, sink)
    digest = sink.hexdigest()  # before closing: the trailing hasher reads the fd
    sink.close_hasher()
    os.close(fd)
    assert (tmp_path / "dst").read_bytes() == DATA[1000:]
    assert digest == hashlib.sha256(DATA[1000:]).hexdigest()


def test_copy_into_from_a_stream_without_fileno(tmp_path: Path) -> None:
    fd, sink = sink_file(tmp_path / "dst", os.O_RDWR)
    copy_into(io.BytesIO(DATA), sink, chunk=2**20)
    digest = sink.hexdigest()  # before closing: the trailing hasher reads the fd
    sink.close_hasher()
    os.close(fd)
    assert (tmp_path / "dst").read_bytes() == DATA
    assert digest == hashlib.sha256(DATA).hexdigest()


def test_sink_write_hashes_large_and_small_writes(tmp_path: Path) -> None:
    fd, sink = sink_file(tmp_path / "dst", os.O_WRONLY)
    for piece in (DATA[:10], DATA[10 : 3 * 2**20], memoryview(DATA)[3 * 2**20 :]):
        sink.write(piece)
    digest = sink.hexdigest()  # before closing: the trailing hasher reads the fd
    sink.close_hasher()
    os.close(fd)
    assert (tmp_path / "dst").read_bytes() == DATA and sink.tell() == len(DATA)
    assert digest == hashlib.sha256(DATA).hexdigest()


def test_trailing_hash_is_of_the_file_not_of_a_buffer_the_caller_reuses(tmp_path: Path) -> None:
    """torch.save-style callers reuse their buffer as soon as write() returns."""
    fd, sink = sink_file(tmp_path / "dst", os.O_RDWR)
    buffer = bytearray(1 << 20)
    expected = hashlib.sha256()
    for round_ in range(12):  # 12 MiB: several trailing jobs
        buffer[:] = bytes([round_]) * len(buffer)
        expected.update(buffer)
        sink.write(buffer)
        buffer[:] = b"\xff" * len(buffer)  # scribble right after the call returns
    digest = sink.hexdigest()
    sink.close_hasher()
    os.close(fd)
    assert digest == expected.hexdigest()
    assert hashlib.sha256((tmp_path / "dst").read_bytes()).hexdigest() == digest
