"""cancel_on_disconnect (gateway/http/disconnect.py): the work stops with the client, and with the request."""

from __future__ import annotations

import asyncio

import pytest

from gateway.http.disconnect import cancel_on_disconnect


class Client:
    """A request whose client goes away when `leave` is set."""

    def __init__(self):
        self.leave = asyncio.Event()

    async def receive(self):
        await self.leave.wait()
        return {"type": "http.disconnect"}


async def work(log: list[str]) -> str:
    try:
        await asyncio.sleep(3600)
        return "done"
    finally:
        log.append("work ended")


def test_the_work_is_cancelled_when_the_client_goes_away():
    async def main():
        log: list[str] = []
        client = Client()
        call = asyncio.ensure_future(cancel_on_disconnect(client, work(log)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        client.leave.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        return list(log)

    assert asyncio.run(main()) == ["work ended"]


def test_the_work_is_cancelled_with_the_request():
    """Cancelling the request itself (uvicorn's shutdown deadline) must not leave its work running on."""

    async def main():
        log: list[str] = []
        call = asyncio.ensure_future(cancel_on_disconnect(Client(), work(log)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return list(log)  # now, not after asyncio.run has cancelled what was left

    assert asyncio.run(main()) == ["work ended"]


def test_the_result_comes_back():
    async def main():
        async def quick():
            return 42

        return await cancel_on_disconnect(Client(), quick())  # type: ignore[arg-type]

    assert asyncio.run(main()) == 42
