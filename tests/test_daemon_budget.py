"""The daemon's in-flight memory (mldash_syncd/budget.py): a byte budget with reusable part buffers.

Peak RSS = idle daemon + at most the budget (DESIGN invariant 5) holds only if every byte in flight is
counted, a buffer is refilled only when nobody reads it any more, and an idle daemon gives its buffers back.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mldash_syncd import budget as budget_module
from mldash_syncd.budget import ByteBudget

MiB = 2**20


async def test_buffers_of_a_size_are_reused_and_counted() -> None:
    budget = ByteBudget(4 * MiB)
    first = await budget.take_buffer(MiB)
    second = await budget.take_buffer(MiB)
    assert len(first) == len(second) == MiB and first is not second
    assert budget.busy == 2 * MiB
    first[:4] = b"abcd"
    await budget.give_back(first)
    assert budget.busy == MiB
    again = await budget.take_buffer(MiB)
    assert again is first  # the same mapping, not a fresh one (no page faults to fill it again)
    await budget.give_back(again)
    await budget.give_back(second)


async def test_takers_wait_for_room_and_one_oversized_item_runs_alone() -> None:
    budget = ByteBudget(2 * MiB)
    held = [await budget.take_buffer(MiB), await budget.take_buffer(MiB)]
    third = asyncio.create_task(budget.take_buffer(MiB))
    await asyncio.sleep(0.05)
    assert not third.done() and budget.busy == 2 * MiB  # never more than the budget in flight
    await budget.give_back(held.pop())
    reused = await asyncio.wait_for(third, 5)
    await budget.give_back(reused)
    await budget.give_back(held.pop())
    assert budget.busy == 0

    huge = await asyncio.wait_for(budget.take_buffer(5 * MiB), 5)  # larger than the budget: alone, not starved
    blocked = asyncio.create_task(budget.acquire(1))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await budget.give_back(huge)
    await asyncio.wait_for(blocked, 5)
    await budget.release(1)


async def test_an_idle_budget_unmaps_its_buffers() -> None:
    budget = ByteBudget(4 * MiB)
    buffers = [await budget.take_buffer(MiB) for _ in range(3)]
    for buffer in buffers[:-1]:
        await budget.give_back(buffer)
    assert not any(b.closed for b in buffers) and budget.used == 3 * MiB  # still in flight: kept for reuse
    await budget.give_back(buffers[-1])
    assert all(b.closed for b in buffers) and budget.used == 0  # nothing in flight: memory goes back to the OS


async def test_reservations_make_room_by_unmapping_idle_buffers() -> None:
    budget = ByteBudget(4 * MiB)
    busy = await budget.take_buffer(MiB)
    idle = [await budget.take_buffer(MiB) for _ in range(3)]
    for buffer in idle:
        await budget.give_back(buffer)
    assert budget.used == 4 * MiB and budget.busy == MiB
    await asyncio.wait_for(budget.acquire(2 * MiB), 5)  # fits beside what is busy: idle buffers make way
    assert budget.used <= budget.capacity and sum(b.closed for b in idle) >= 2
    await budget.release(2 * MiB)
    await budget.give_back(busy)
    assert budget.used == 0


async def test_a_buffer_still_viewed_is_not_refilled_until_the_view_is_gone() -> None:
    budget = ByteBudget(MiB)
    buffer = await budget.take_buffer(MiB)
    view = memoryview(buffer)  # a reader that outlived its call, e.g. a cancelled request's writer
    returning = asyncio.create_task(budget.give_back(buffer))
    taker = asyncio.create_task(budget.take_buffer(MiB))
    await asyncio.sleep(0.05)
    assert not returning.done() and not taker.done() and budget.busy == MiB
    view.release()
    await asyncio.wait_for(returning, 5)
    assert await asyncio.wait_for(taker, 5) is buffer
    await budget.give_back(buffer)


async def test_a_buffer_viewed_for_too_long_is_dropped_not_refilled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "_EXPORT_PATIENCE", 0.05)
    budget = ByteBudget(2 * MiB)
    buffer = await budget.take_buffer(MiB)
    view = memoryview(buffer)
    await asyncio.wait_for(budget.give_back(buffer), 5)
    assert budget.used == 0  # its budget is back ...
    fresh = await budget.take_buffer(MiB)
    assert fresh is not buffer  # ... but it is never handed out again while read
    view[:1] = b"x"
    view.release()
    await budget.give_back(fresh)


async def test_cancelled_while_waiting_for_a_reader_still_returns_the_budget() -> None:
    budget = ByteBudget(MiB)
    buffer = await budget.take_buffer(MiB)
    view = memoryview(buffer)
    returning = asyncio.create_task(budget.give_back(buffer))
    await asyncio.sleep(0.02)
    returning.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await returning
    assert budget.used == 0
    other = await asyncio.wait_for(budget.take_buffer(MiB), 5)
    assert other is not buffer
    view.release()
    await budget.give_back(other)


async def test_a_cancelled_taker_leaves_nothing_behind() -> None:
    budget = ByteBudget(MiB)
    held = await budget.take_buffer(MiB)
    waiting = asyncio.create_task(budget.take_buffer(MiB))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await budget.give_back(held)
    assert budget.used == 0 and held.closed  # no stale waiter keeps the idle buffers mapped
