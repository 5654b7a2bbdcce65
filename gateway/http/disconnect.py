"""Noticing that an HTTP client went away, so that its abandoned work stops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


async def until_disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the request body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first: an abandoned request must not keep
    the engine busy."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this request itself is cancelled (uvicorn's shutdown deadline): its
        task.cancel()  # work goes with it instead of running on unowned
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: an error of the abandoned work is nobody's to report
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task})  # its own cleanup first: closing a generation cancels it in the engine
        raise asyncio.CancelledError("client disconnected")
    return task.result()
