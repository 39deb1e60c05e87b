"""SHA256 computed while bytes are written, overlapping the hash with the write.

hashlib and os.write both release the GIL for large buffers, so hashing a chunk on a helper thread
while the calling thread writes it costs max(hash, write) instead of their sum. Each `write`
waits for its own chunk's hash before returning: the caller (torch.save, say) may reuse or mutate
its buffer as soon as write() returns, and the digest must describe exactly the bytes written.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

_PARALLEL_MIN = 256 * 1024  # below this the thread hand-off costs more than it saves
COPY_CHUNK = 8 * 2**20
_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mldash-hash")


def write_all(fd: int, data: memoryview) -> None:
    """os.write until everything is written: a single write may be short (a filling disk, a signal)."""
    while data:
        written = os.write(fd, data)
        data = data[written:]


class HashingSink:
    """A write-only binary file object over an fd that tracks size and SHA256 of what was written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _PARALLEL_MIN:
            hashed = _executor.submit(self._hasher.update, view)
            try:
                write_all(self._fd, view)
            finally:
                hashed.result()
        else:
            self._hasher.update(view)
            write_all(self._fd, view)
        self.size += view.nbytes
        return view.nbytes

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    # The file-object surface serializers expect (pickle, torch, matplotlib, PIL, imageio).
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

    def fileno(self) -> int:  # some writers probe it; writing through the fd would skip the hash
        raise OSError("HashingSink has no usable fileno")


def copy_into(source: BinaryIO, sink: HashingSink, chunk: int = COPY_CHUNK) -> None:
    """Copy a readable binary file into the sink, reading the next chunk while the last is written."""
    buffers = [bytearray(chunk), bytearray(chunk)]
    turn = 0
    filled = source.readinto(buffers[turn])  # type: ignore[attr-defined]
    while filled:
        current = memoryview(buffers[turn])[:filled]
        turn ^= 1
        nxt = _executor.submit(source.readinto, buffers[turn])  # type: ignore[attr-defined]
        try:
            sink.write(current)
        finally:
            filled = nxt.result()
