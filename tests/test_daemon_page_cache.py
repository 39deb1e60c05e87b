"""The daemon reads every spooled byte once and drops it from the page cache behind it (upload._read_into):
a large checkpoint must not push the training job's data out of memory."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from mldash_syncd.upload import _read_into

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise are Linux")


def cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore over a read-only mapping of it)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = ctypes.create_string_buffer(pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(byte & 1 for byte in vector.raw)


def _drops_pages(directory: Path) -> bool:
    """Whether this filesystem drops clean pages on request at all (tmpfs keeps them: they are the file)."""
    probe = directory / "probe"
    probe.write_bytes(os.urandom(64 * 2**10))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.pread(fd, 64 * 2**10, 0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    dropped = cached_pages(probe) == 0
    probe.unlink()
    return dropped


def test_a_part_read_leaves_no_cached_pages_behind(tmp_path: Path) -> None:
    if not _drops_pages(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} keeps clean pages cached (tmpfs?): nothing to observe")
    blob = tmp_path / "blob"
    size = 4 * 2**20
    blob.write_bytes(os.urandom(size))
    fd = os.open(blob, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages: the kernel drops only those
        os.pread(fd, size, 0)
        assert cached_pages(blob) == size // mmap.PAGESIZE, "the test needs the file cached to start with"

        first = bytearray(size // 2)
        _read_into(fd, memoryview(first), 0, 1)
        cached = cached_pages(blob)
        assert cached <= size // 2 // mmap.PAGESIZE + 1, f"{cached} pages still cached after the first half's read"
        second = bytearray(size - len(first))
        _read_into(fd, memoryview(second), len(first), 1)
        assert cached_pages(blob) == 0
        assert bytes(first + second) == blob.read_bytes()  # what was read is still the file's bytes
    finally:
        os.close(fd)
