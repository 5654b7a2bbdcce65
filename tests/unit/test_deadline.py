"""A request's time limit over a stream of items (gateway/http/deadline.py): one timer for the stream, which
cuts the wait for an item and refuses to wait once it fired, and leaves other cancellations alone."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.deadline import RequestDeadline
from mmserve.errors import DeadlineError


async def ticking(count: int, pause_s: float, cancelled: list[bool] | None = None):
    try:
        for i in range(count):
            await asyncio.sleep(pause_s)
            yield i
    except asyncio.CancelledError:
        if cancelled is not None:
            cancelled.append(True)
        raise


def test_items_within_the_limit_all_come():
    async def go():
        return [item async for item in RequestDeadline(5).bounded(ticking(20, 0.001))]

    assert asyncio.run(go()) == list(range(20))


def test_a_wait_for_an_item_is_cut_at_the_limit_and_the_source_cancelled():
    cancelled: list[bool] = []

    async def go():
        got = []
        with pytest.raises(DeadlineError, match="time limit of 0.2 s"):
            async for item in RequestDeadline(0.2).bounded(ticking(3, 0.15, cancelled)):
                got.append(item)
        return got

    assert asyncio.run(go()) == [0] and cancelled == [True]


def test_past_the_limit_no_further_item_is_awaited():
    async def go():
        items = RequestDeadline(0.05).bounded(ticking(3, 0))
        first = await anext(items)
        await asyncio.sleep(0.1)  # the consumer is busy (sending) when the time is up
        with pytest.raises(DeadlineError):
            await anext(items)
        return first

    assert asyncio.run(go()) == 0


def test_another_cancellation_is_not_turned_into_a_deadline_error():
    async def consume():
        return [item async for item in RequestDeadline(5).bounded(ticking(3, 1))]

    async def go():
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())


def test_no_limit_passes_items_through():
    async def go():
        return [item async for item in RequestDeadline(0).bounded(ticking(3, 0))]

    assert asyncio.run(go()) == [0, 1, 2]
