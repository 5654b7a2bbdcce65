"""The vision service's bounded queue, on a real server on loopback: images in work (preprocessing,
queued or encoding) stay within max_queued_images; a request that would go over is refused at once with
RESOURCE_EXHAUSTED naming the limit (the gateway's 429 + Retry-After), an image already being encoded
joins that work and takes no room, and the room comes back when the work ends."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from tests.service.test_vision_failures import embed, images, serve
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder


class BlockedForward:
    """The encoder's model, holding every forward until `release` is set."""

    def __init__(self, model):
        self.model, self.entered, self.release = model, threading.Event(), threading.Event()

    def __call__(self, **inputs):
        self.entered.set()
        assert self.release.wait(60), "the test never released the forward"
        return self.model(**inputs)


@pytest.fixture
def encoder(tiny_checkpoint):
    config = VisionConfig(checkpoint=str(tiny_checkpoint), cache_bytes=0, max_queued_images=2)
    encoder = VisionEncoder(config)
    yield encoder
    encoder.close()


def test_a_request_over_the_queue_bound_is_refused_at_once_and_room_comes_back(
    encoder, monkeypatch, image_dir
):
    forward = BlockedForward(encoder.model)
    monkeypatch.setattr(encoder, "model", forward)
    a, b, c = images(image_dir)

    async def body(stub, channel):
        first = asyncio.create_task(embed(stub, a, b))  # 2 images in work: the bound
        assert await asyncio.to_thread(forward.entered.wait, 30)
        refused = await asyncio.wait_for(embed(stub, c), 10)  # at once, not after the forward
        joined = asyncio.create_task(embed(stub, a))  # a is being encoded: no new room needed
        await asyncio.sleep(0.2)
        forward.release.set()
        return await first, refused, await joined, await embed(stub, c)

    first, refused, joined, later = serve(encoder, body)
    assert isinstance(refused, grpc.aio.AioRpcError), refused
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 2 (VISION_MAX_QUEUED_IMAGES)" in refused.details()
    assert (first, joined, later) == (2, 1, 1)
