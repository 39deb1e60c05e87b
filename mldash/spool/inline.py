"""The sink of a small save whose bytes go into its manifest (format 2) instead of a blob file."""

from __future__ import annotations

import hashlib


class InlineSink:
    """A write-only binary file object collecting bytes in memory, with their size and SHA256.

    `hashing=False` (deferred checksum mode): `hexdigest()` is None, as for a blob (the daemon hashes)."""

    def __init__(self, *, hashing: bool = True) -> None:
        self._buffer = bytearray()
        self.hashing = hashing

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
        return hashlib.sha256(self._buffer).hexdigest() if self.hashing else None

    # The file-object surface serializers expect (same as HashingSink).
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("InlineSink has no fileno")
