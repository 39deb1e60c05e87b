"""SHA256 computed while bytes are written, overlapping the hash with the caller's own work.

SHA256 of 1 GiB takes ~0.5 s here — longer than torch.save or cp of the same bytes — so it must not
sit in series with them. Large writes are hashed *behind* the writes: a thread reads back what just
landed in the spool file (page cache) and hashes it while the caller keeps serializing; small writes
are hashed inline. The digest is of the file's bytes, never of the caller's buffer, so a caller that
reuses or mutates its buffer as soon as write() returns (torch.save does) cannot skew it. Uploads of
whole files copy in the kernel (copy_file_range) with the same hash-behind. hashlib, os.write and
os.preadv all release the GIL, so the two threads really run side by side.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

_PARALLEL_MIN = 256 * 1024  # below this the thread hand-off costs more than it saves
_TRAIL_MIN = 4 * 2**20  # bytes written before a trailing-hash job is queued
COPY_CHUNK = 8 * 2**20
_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mldash-hash")


def _readable(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    except OSError:
        return False


def write_all(fd: int, data: memoryview) -> None:
    """os.write until everything is written: a single write may be short (a filling disk, a signal)."""
    while data:
        written = os.write(fd, data)
        data = data[written:]


class WriteOnlySink:
    """The file-object surface serializers expect of a sink (pickle, torch, matplotlib, PIL, imageio):
    write-only, not seekable, `tell()` = bytes written so far (`size`), no file descriptor."""

    size: int

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

    def fileno(self) -> int:  # some writers probe it; writing around the sink would skip the hash
        raise OSError(f"{type(self).__name__} has no usable fileno")


class HashingSink(WriteOnlySink):
    """A write-only binary file object over an fd that tracks size and SHA256 of what was written.

    `hash_limit` (from the checksum setting, see `Settings.hash_limit`): the most bytes the save hashes.
    Past it — or from the start when it is 0 (the deferred mode), or when a copied file is known to be
    larger — hashing stops: only the size is tracked, `hexdigest()` is None and the daemon hashes the bytes
    in its one read of them. None hashes everything."""

    def __init__(self, fd: int, *, hash_limit: int | None = None) -> None:
        self._fd = fd
        self.hash_limit = hash_limit
        self.hashing = hash_limit is None or hash_limit > 0
        self._hasher = hashlib.sha256() if self.hashing else None
        self.size = 0
        self._readable = self.hashing and _readable(fd)
        self._trail: ThreadPoolExecutor | None = None  # one thread hashing the file behind the writes
        self._trail_jobs: list[Future] = []
        self._trail_buffer: bytearray | None = None
        self._hashed_to = 0  # bytes already hashed, or queued for the trailing hasher

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self._hasher is not None and self.hash_limit is not None and self.size + view.nbytes > self.hash_limit:
            self._give_up_hashing()
        if self._hasher is None:
            write_all(self._fd, view)
        elif self._hashed_to == self.size and self._trail is None and view.nbytes < _PARALLEL_MIN:
            # nothing trails behind: a small write is hashed inline, in order
            self._hasher.update(view)
            write_all(self._fd, view)
        elif self._readable:
            # Hash behind the writes, from the page cache: the caller (torch.save) gets control back as soon
            # as its bytes are in the file and goes on serializing while a thread hashes what already landed.
            # Hashing the file, not the caller's buffer, keeps the digest exact even if the caller reuses it.
            write_all(self._fd, view)
            self.size += view.nbytes
            self._queue_trailing(final=False)
            return view.nbytes
        else:  # a write-only fd: hash this chunk beside its write, and wait for both
            hashed = _executor.submit(self._hasher.update, view)
            try:
                write_all(self._fd, view)
            finally:
                hashed.result()
        self.size += view.nbytes
        self._hashed_to = self.size
        return view.nbytes

    def _queue_trailing(self, *, final: bool) -> None:
        pending = self.size - self._hashed_to
        if pending == 0 or (not final and pending < _TRAIL_MIN):
            return
        if self._trail is None:
            self._trail = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mldash-hash-behind")
            self._trail_buffer = bytearray(COPY_CHUNK)
        self._trail_jobs.append(self._trail.submit(self._hash_spooled, self._trail_buffer, self._hashed_to, pending))
        self._hashed_to = self.size
        while self._trail_jobs and self._trail_jobs[0].done():  # surface a failed read early
            self._trail_jobs.pop(0).result()

    def _give_up_hashing(self) -> None:
        """Past the hash limit: no digest for this save. Queued read-back jobs are dropped; a running one is
        waited for (it reads our fd, which the caller closes after us)."""
        self._hasher = None
        if self._trail is not None:
            self._trail.shutdown(wait=True, cancel_futures=True)
            self._trail = None
        self._trail_jobs.clear()

    def close_hasher(self) -> None:
        """Stop the trailing hasher (waiting for its reads of this fd): call before closing the fd,
        on success and on error alike."""
        if self._trail is not None:
            self._trail.shutdown(wait=True)
            self._trail = None

    def reset(self) -> None:
        """Forget what was hashed (only valid while nothing has reached the file)."""
        self._hasher = hashlib.sha256() if self.hashing else None
        self.size = self._hashed_to = 0

    def hexdigest(self) -> str | None:
        """SHA256 hex of everything written (waits for the trailing hasher, which reads the fd: call it
        before closing the file); None when not hashing (deferred checksum mode)."""
        if self._hasher is None:
            return None
        self._queue_trailing(final=True)  # whatever was written since the last queued job
        if self._trail is not None:
            for job in self._trail_jobs:
                job.result()
            self._trail_jobs.clear()
        return self._hasher.hexdigest()

    def copy_file(self, source_fd: int, offset: int = 0, chunk: int = COPY_CHUNK) -> None:
        """Copy a file in the kernel (copy_file_range: no user-space copy of the bytes) and hash what
        landed in the spool right behind it, from the page cache: chunk k is hashed while chunk k+1 is
        copied. The digest is therefore of the spooled bytes themselves — exactly the snapshot.
        Raises OSError before writing anything if the kernel or filesystem cannot copy_file_range."""
        if self._hasher is not None and self.hash_limit is not None:
            with contextlib.suppress(OSError):
                if os.fstat(source_fd).st_size - offset > self.hash_limit:
                    self._give_up_hashing()  # known to be over the limit: do not start
        if self._hasher is None:
            self._copy_only(source_fd, offset, chunk)
            return
        if fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            raise OSError(errno.EBADF, "the spool temp file must be open for reading to hash it behind the copy")
        buffer = bytearray(chunk)
        hashed = None
        position = self.size
        try:
            while True:
                copied = os.copy_file_range(source_fd, self._fd, chunk, offset, position)
                if copied == 0:
                    self._hashed_to = position
                    break
                if hashed is not None:
                    hashed.result()
                hashed = _executor.submit(self._hash_spooled, buffer, position, copied)
                offset += copied
                position += copied
                self.size = position
        finally:
            if hashed is not None:
                hashed.result()

    def _copy_only(self, source_fd: int, offset: int, chunk: int) -> None:
        position = self.size
        while copied := os.copy_file_range(source_fd, self._fd, chunk, offset, position):
            offset += copied
            position += copied
            self.size = position

    def _hash_spooled(self, buffer: bytearray, position: int, length: int) -> None:
        view = memoryview(buffer)
        while length:
            got = os.preadv(self._fd, [view[: min(length, len(buffer))]], position)
            if got == 0:
                raise OSError(f"spool temp file shorter than what was copied into it (at {position})")
            self._hasher.update(view[:got])
            position += got
            length -= got


_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM)


def copy_into(source: BinaryIO, sink: HashingSink, chunk: int = COPY_CHUNK) -> None:
    """Copy a readable binary file into the sink: in the kernel when both are plain files (see
    `HashingSink.copy_file`), else reading the next chunk while the last is written and hashed."""
    if isinstance(sink, HashingSink) and sink.size == 0:
        try:
            source_fd, start = source.fileno(), source.tell()
        except (OSError, AttributeError, ValueError):
            source_fd = None
        if source_fd is not None:
            try:
                sink.copy_file(source_fd, start, chunk)
                return
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE or sink.size:
                    raise
                sink.reset()  # nothing was written: fall back to the user-space copy
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
