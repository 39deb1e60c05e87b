"""Spool byte quota: admission of new entries, serialised between writer processes by an flock.

The quota bounds the bytes of *admitted* blobs (blobs/). A writer first writes its temp file, then
takes the quota lock only to check room and link the entry into place — a few syscalls — so eight
training ranks never queue behind each other's serialization. While a temp file is being written
it is not counted: the spool can transiently exceed the quota by the artifacts being written.

Summing blobs/ costs ~3 µs per blob (30 ms with 10,000 spooled, as after a long outage), so the lock file
also holds a ledger: the total of blobs/ as of the directory's identity and mtime. Admissions are the only
way bytes enter blobs/, and each one updates the ledger under the lock; anything else that changes blobs/
(eviction, recovery, a copied spool) changes the directory's mtime, and the next admission sums it again.
What the mtime cannot show — a change within the same timestamp tick — is a removal, so the ledger can
only overstate what is in use, never understate it; and an entry the ledger says does not fit is checked
against a fresh sum before it waits, so an overstatement never refuses a save. A writer marks the ledger
before it links and rewrites it after; one that dies in between leaves the mark, and the next admission
sums blobs/ again. (Writers without a quota setting neither take the lock nor count: as before, they are
not limited by it, and a blob one of them adds in the same tick as the ledger's mtime goes uncounted.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Iterator

from mldash.spool.layout import SpoolLayout, directory_bytes, open_private

# magic, st_dev, st_ino, st_mtime_ns of blobs/ (-1: a writer was linking), total bytes; then a CRC32 of it all.
_LEDGER = struct.Struct("<4sQQqQ")
_MAGIC = b"MQL1"
_LINKING = -1


def spooled_bytes(layout: SpoolLayout) -> int:
    """Sum of blobs/ by listing it (what the ledger saves admissions from doing)."""
    return directory_bytes(layout.blobs_dir)


class QuotaLedger:
    """The bytes in blobs/, for the holder of the quota lock. `used()` then, around the link of an admitted
    blob, `linking()` and `linked(size)`."""

    def __init__(self, layout: SpoolLayout, fd: int) -> None:
        self.layout = layout
        self._fd = fd
        self._used: int | None = None
        self.from_record = False  # whether the last `used()` came from the ledger (it may overstate) or a sum

    def used(self, *, fresh: bool = False) -> int:
        """Bytes in blobs/: from the ledger while blobs/ is unchanged (possibly more than now, if a removal
        shared a timestamp tick with the ledger's record), or `fresh`ly summed."""
        before = os.stat(self.layout.blobs_dir)
        recorded = None if fresh else self._read()
        if recorded is not None and recorded[:3] == (before.st_dev, before.st_ino, before.st_mtime_ns):
            self.from_record = True
            self._used = recorded[3]
            return self._used
        self.from_record = False
        # Stat first, then sum: a removal during the sum changes the mtime again (the next admission sums
        # anew) or shares the tick (the sum is then at most too high). No addition can happen: we hold the lock.
        self._used = spooled_bytes(self.layout)
        self._write(before, self._used)
        return self._used

    def linking(self) -> None:
        """Before linking a blob: should this process die before `linked`, the next admission sums blobs/."""
        self._write(None, 0)

    def linked(self, size: int) -> None:
        """After linking a blob of `size` bytes (and before releasing the lock)."""
        if self._used is None:
            raise RuntimeError("QuotaLedger.linked() without used() first")
        self._used += size
        self._write(os.stat(self.layout.blobs_dir), self._used)

    def _read(self) -> tuple[int, int, int, int] | None:
        data = os.pread(self._fd, _LEDGER.size + 4, 0)
        if len(data) != _LEDGER.size + 4 or zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
            return None  # new, torn or foreign: sum blobs/
        magic, dev, ino, mtime_ns, total = _LEDGER.unpack(data[:-4])
        if magic != _MAGIC or mtime_ns == _LINKING:
            return None
        return dev, ino, mtime_ns, total

    def _write(self, stat: os.stat_result | None, total: int) -> None:
        fields = (0, 0, _LINKING) if stat is None else (stat.st_dev, stat.st_ino, stat.st_mtime_ns)
        body = _LEDGER.pack(_MAGIC, *fields, total)
        os.pwrite(self._fd, body + zlib.crc32(body).to_bytes(4, "little"), 0)


@contextlib.contextmanager
def quota_lock(layout: SpoolLayout) -> Iterator[QuotaLedger]:
    fd = open_private(layout.quota_lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield QuotaLedger(layout, fd)
    finally:
        os.close(fd)  # closing the fd releases the flock
