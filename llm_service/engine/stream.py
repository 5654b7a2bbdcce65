"""A request's stream of outputs, handed from the engine's worker thread to the caller's event loop."""

from __future__ import annotations

import asyncio

from mmserve.wire import GenerateOutput


class RequestStream:
    """The bridge from the worker thread to one caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def put(self, item: GenerateOutput | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.closed = True
