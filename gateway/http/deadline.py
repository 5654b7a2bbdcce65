"""A chat or completion request's time limit (REQUEST_TIMEOUT), over every step of its work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from mmserve.errors import DeadlineError

T = TypeVar("T")


class RequestDeadline:
    """Counts from its creation; `timeout_s` 0 is no limit. Work run under it that is still going when
    the time is up is cancelled (a generation's cancellation reaches the LLM service, which frees its
    KV) and DeadlineError takes its place: a 504, or an SSE error event + [DONE] once a stream began."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._when = asyncio.get_running_loop().time() + timeout_s if timeout_s else None

    async def run(self, work: Awaitable[T]) -> T:
        """`await work`, cut at the deadline."""
        if self._when is None:
            return await work
        try:
            async with asyncio.timeout_at(self._when):
                return await work
        except TimeoutError:
            raise self._expired() from None

    async def bounded(self, items: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """`items`, each one awaited under the deadline, as `run` would, with one timer for the whole
        stream instead of one per item (that was a quarter of the gateway's own work per token): when it
        fires while an item is awaited, the wait is cancelled; once it fired, no item is awaited."""
        if self._when is None:
            async for item in items:
                yield item
            return
        fired = False
        waiting: list[asyncio.Task] = []  # the task awaiting an item, while it does

        def expire() -> None:
            nonlocal fired
            fired = True
            for task in waiting:
                task.cancel()

        timer = asyncio.get_running_loop().call_at(self._when, expire)
        try:
            while not fired:
                task = asyncio.current_task()
                assert task is not None, "iterated by a task"
                cancelling = task.cancelling()  # as asyncio.timeout tells its cancellation from others
                waiting.append(task)
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if fired and task.uncancel() <= cancelling:
                        raise self._expired() from None
                    raise
                finally:
                    waiting.clear()
                yield item
            raise self._expired()
        finally:
            timer.cancel()

    def _expired(self) -> DeadlineError:
        return DeadlineError(
            f"the request did not finish within the server's time limit of {self.timeout_s:g} s "
            "(REQUEST_TIMEOUT / --request-timeout); its generation was stopped",
            code="timeout",
        )
