"""A request's stream of outputs, handed from the engine's worker thread to the caller's event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from mmserve.wire import GenerateOutput

# Outputs merged into one at most: a message's size stays bounded however far its caller fell behind.
MAX_MERGED = 64


class RequestStream:
    """The bridge from the worker thread to one caller's event loop.

    The worker queues outputs (`push`) and wakes the callers of a step's streams with one call into each
    event loop (`wake`); an error is queued and woken at once (`put`). The caller takes every output
    queued so far as one (`get`): a caller that fell behind catches up in one message, not one per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.closed = False
        # appended by the worker, popped by the caller (deque appends and pops are atomic)
        self._items: deque[GenerateOutput | Exception] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the caller's, while it waits in get()
        self._wake_pending = False  # a wake-up of this stream is scheduled on the loop and has not run

    def push(self, item: GenerateOutput) -> None:
        """Worker thread: queue `item`; the caller sees it once `wake` names this stream."""
        self._items.append(item)

    def put(self, item: GenerateOutput | Exception) -> None:
        """Worker thread: queue `item` and wake the caller."""
        self._items.append(item)
        wake([self])

    async def get(self) -> GenerateOutput:
        """The outputs queued so far, merged into one (waits for one); raises a queued error once the
        outputs before it were taken."""
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        first = self._items.popleft()
        if isinstance(first, Exception):
            raise first
        ready = [first]
        while self._items and len(ready) < MAX_MERGED and not isinstance(self._items[0], Exception):
            ready.append(self._items.popleft())  # type: ignore[arg-type]  # not an Exception: checked
        return first if len(ready) == 1 else merged(ready)

    def _woken(self) -> None:
        """Event loop: the wake-up `wake` scheduled."""
        self._wake_pending = False  # first: an item queued from here on schedules a new wake-up
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def wake(streams: Iterable[RequestStream]) -> None:
    """Worker thread, after queueing: wake the callers of `streams`, with one call into each event loop
    (a stream whose wake-up is still pending needs none: it will see what was queued before it runs)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[RequestStream]] = {}
    for stream in streams:
        if not stream._wake_pending:
            stream._wake_pending = True
            by_loop.setdefault(stream.loop, []).append(stream)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_wake_all, group)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            for stream in group:
                stream.closed = True


def _wake_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream._woken()


def merged(outputs: list[GenerateOutput]) -> GenerateOutput:
    """Consecutive outputs of one sequence as one output (a message may carry several tokens); only the
    last one can end the sequence, so it gives the finish reason and usage."""
    last = outputs[-1]
    logprobs = None if last.logprobs is None else [lp for out in outputs for lp in out.logprobs or []]
    token_ids = [token for out in outputs for token in out.token_ids]
    return GenerateOutput(token_ids, last.finish_reason, last.usage, logprobs)
