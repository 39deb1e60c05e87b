"""A byte budget shared by every upload: bounds the daemon's memory to what is in flight.

Each multipart part and each single-PUT object holds its bytes in memory while it is sent; they
take their size from the budget first. One item larger than the whole budget still runs alone, so
nothing can starve.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, amount: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + amount <= self.capacity)
            self.used += amount

    async def release(self, amount: int) -> None:
        async with self._changed:
            self.used -= amount
            self._changed.notify_all()
