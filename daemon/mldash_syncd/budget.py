"""The daemon's memory for bytes in flight: one byte budget, and the part buffers that live inside it.

Every multipart part and every single-PUT object holds its bytes in memory while it is sent; each takes its
size from the budget first, and one item larger than the whole budget still runs alone, so nothing can
starve. Peak RSS is therefore the idle daemon plus at most the budget, whatever the file sizes.

Part buffers are anonymous mappings that are reused, not allocated per part. A fresh 8 MiB mapping costs
~2,000 page faults to fill (measured: reading 1 GiB into fresh mappings 0.5 s of CPU, into reused ones
0.04 s), and freeing a part's `bytes` was not exact either: a worker thread can still hold the last
reference for a moment after the upload returned, so the next part's allocation briefly overlapped it and
the peak went one part over the budget. A buffer here is given back explicitly, refilled only when nobody
holds a view of it any more (a cancelled request's writer could still be reading it), and unmapped when
nothing is in flight, so an idle daemon holds no part memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import Callable

_EXPORT_POLL = 0.001   # seconds between checks of a given-back buffer that is still being read
_EXPORT_PATIENCE = 2.0  # after this, stop waiting for the reader and let the buffer go (see give_back)


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0  # bytes reserved, plus the buffers handed out or idle in the pool
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._idle_bytes = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def busy(self) -> int:
        """Bytes actually in flight (reserved or in buffers handed out)."""
        return self.used - self._idle_bytes

    # ---- plain reservations (bytes the caller allocates itself) --------------------------------
    async def acquire(self, amount: int) -> None:
        await self._wait_until(lambda: self._fits(amount))
        self._make_room(amount)
        self.used += amount

    async def release(self, amount: int) -> None:
        self.used -= amount
        self._settle()

    # ---- reusable part buffers -----------------------------------------------------------------
    async def take_buffer(self, size: int) -> mmap.mmap:
        """A writable buffer of exactly `size` bytes (contents undefined), counted against the budget until
        `give_back`. Buffers of the same size are reused."""
        await self._wait_until(lambda: bool(self._idle.get(size)) or self._fits(size))
        pool = self._idle.get(size)
        if pool:
            self._idle_bytes -= size
            buffer = pool.pop()
            if not pool:
                del self._idle[size]
            return buffer
        self._make_room(size)
        self.used += size
        try:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        except BaseException:
            self.used -= size
            self._settle()
            raise

    async def give_back(self, buffer: mmap.mmap) -> None:
        """Return a buffer from `take_buffer`. Its budget stays taken until no view of it is left: a request
        that was cancelled may still be writing from it, and refilling it then would send other bytes."""
        viewed = _has_views(buffer)
        try:
            waited = 0.0
            while viewed and waited < _EXPORT_PATIENCE:
                await asyncio.sleep(_EXPORT_POLL)
                waited += _EXPORT_POLL
                viewed = _has_views(buffer)
        finally:  # also when cancelled while waiting: the budget must come back whatever happens
            size = len(buffer)
            if viewed is False:
                self._idle.setdefault(size, []).append(buffer)
                self._idle_bytes += size
            else:
                # Still read after 2 s (a writer stuck in a dead connection), cancelled while waiting, or a
                # platform where we cannot tell: never refill it. It is unmapped when the last reader lets go.
                self.used -= size
            self._settle()

    # ---- internals ----------------------------------------------------------------------------
    def _fits(self, amount: int) -> bool:
        return self.busy == 0 or self.busy + amount <= self.capacity

    def _make_room(self, amount: int) -> None:
        """Unmap idle buffers (of sizes nobody asked for now) until `amount` fits beside the rest."""
        while self._idle_bytes and self.used + amount > self.capacity:
            size, pool = next(iter(self._idle.items()))
            _unmap(pool.pop())
            if not pool:
                del self._idle[size]
            self._idle_bytes -= size
            self.used -= size

    def _settle(self) -> None:
        if self.busy == 0 and not self._waiters:
            self._unmap_idle()  # nothing in flight and nobody waiting: an idle daemon holds no part memory
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _unmap_idle(self) -> None:
        for pool in self._idle.values():
            for buffer in pool:
                _unmap(buffer)
        self.used -= self._idle_bytes
        self._idle.clear()
        self._idle_bytes = 0

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while not ready():
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:  # every wake-up wakes all waiters: a cancelled one swallows nothing
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise


def _unmap(buffer: mmap.mmap) -> None:
    """Unmap an idle buffer — unless a late reader took a view of it meanwhile (close() refuses then): it is
    unmapped when that reader lets go of it, as any buffer given back while read."""
    with contextlib.suppress(BufferError):
        buffer.close()


def _has_views(buffer: mmap.mmap) -> bool | None:
    """Whether any memoryview of the buffer is alive (None: cannot tell on this platform). mmap refuses to
    resize while views exist; resizing to the same size is otherwise a no-op (an mremap of the same length)."""
    if buffer.closed:
        return False
    try:
        buffer.resize(len(buffer))
    except BufferError:
        return True
    except (OSError, SystemError, ValueError, TypeError):
        return None
    return False
