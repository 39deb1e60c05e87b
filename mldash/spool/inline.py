"""The sink of a small save whose bytes go into its manifest (format 2) instead of a blob file."""

from __future__ import annotations

import hashlib

from mldash.spool.hashing import WriteOnlySink


class InlineSink(WriteOnlySink):
    """A write-only binary file object collecting bytes in memory, with their size and SHA256.

    `hash_limit` as for HashingSink: over it (0 = the deferred mode) `hexdigest()` is None and the daemon hashes."""

    def __init__(self, *, hash_limit: int | None = None) -> None:
        self._buffer = bytearray()
        self.hash_limit = hash_limit

    @property
    def size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._buffer += view  # a copy: the caller may reuse its buffer as soon as write() returns
        return view.nbytes

    def getvalue(self) -> bytes:
        return bytes(self._buffer)

    def hexdigest(self) -> str | None:
        # hashed once, at the end: exactly the bytes that are spooled
        if self.hash_limit is not None and self.size > self.hash_limit:
            return None
        return hashlib.sha256(self._buffer).hexdigest()
