"""A gRPC service on loopback whose health follows a liveness callable the way `serve` makes it
(mmserve.grpc_util), health checks with a deadline, and the clean error a failure must give: for the
engine and encoder failure tests."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.grpc_util import _watch, channel_options, start_server


def serve_watched(add_servicer, service: str, is_alive, body):
    """`await body(channel)` against a fresh server reporting NOT_SERVING once `is_alive()` is false."""

    async def go():
        server, health, port = await start_server(add_servicer, service, "127.0.0.1", 0, 64 << 20)
        watch = asyncio.get_running_loop().create_task(_watch(is_alive, health, service))
        try:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=channel_options(64 << 20)
            ) as ch:
                return await body(ch)
        finally:
            watch.cancel()
            await server.stop(0)

    return asyncio.run(go())


async def health_status(channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return (await health_pb2_grpc.HealthStub(channel).Check(request)).status


async def wait_for_status(channel, service: str, wanted: int, deadline_s: float = 10.0) -> int:
    """Poll the service's health until it reports `wanted`; what it reports at the deadline otherwise."""
    until = time.monotonic() + deadline_s
    while (got := await health_status(channel, service)) != wanted and time.monotonic() < until:
        await asyncio.sleep(0.1)
    return got


def assert_unavailable(result, *needles: str) -> None:
    """`result` is an UNAVAILABLE error whose details name every needle."""
    assert isinstance(result, grpc.aio.AioRpcError), result
    assert result.code() == grpc.StatusCode.UNAVAILABLE, (result.code(), result.details())
    for needle in needles:
        assert needle in result.details(), result.details()
