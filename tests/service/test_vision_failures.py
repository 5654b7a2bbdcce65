"""When the vision encoder's forward raises: a real VisionService server on loopback whose model is
made to fail on demand, a real client, and the service's gRPC health watched the way `serve` does.

- A failed forward fails its images with UNAVAILABLE naming the error (never INTERNAL); a batch that
  fails is retried image by image, the encoder goes on, and its health stays SERVING.
- A success resets the count; three failed forwards in a row, or one fatal (CUDA) error, fail the
  encoder: health turns NOT_SERVING and later requests get UNAVAILABLE with the reason.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from mmserve.proto import vision_pb2, vision_pb2_grpc
from tests.service.watched import assert_unavailable, health_status, serve_watched, wait_for_status
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder
from vision_service.server import VisionServicer

SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def encoder(tiny_checkpoint):
    encoder = VisionEncoder(VisionConfig(checkpoint=str(tiny_checkpoint), cache_bytes=0))
    yield encoder
    encoder.close()


class FailingForward:
    """The encoder's model, except that the next `remaining` forwards raise `error`."""

    def __init__(self, model, error: Exception):
        self.model = model
        self.error = error
        self.remaining = 0

    def __call__(self, **inputs):
        if self.remaining > 0:
            self.remaining -= 1
            raise self.error
        return self.model(**inputs)


def failing(encoder: VisionEncoder, monkeypatch, error: Exception) -> FailingForward:
    forward = FailingForward(encoder.model, error)
    monkeypatch.setattr(encoder, "model", forward)
    return forward


def serve(encoder: VisionEncoder, body):
    """`body(stub, channel)` against a server whose health follows `encoder.is_alive` as in `serve`."""

    def add(server):
        vision_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(encoder), server)

    return serve_watched(
        add, SERVICE, encoder.is_alive, lambda ch: body(vision_pb2_grpc.VisionServiceStub(ch), ch)
    )


async def embed(stub, *images: bytes) -> int | grpc.aio.AioRpcError:
    """How many embeddings came back, or the error."""
    request = vision_pb2.EmbedRequest(request_id="t", images=[vision_pb2.ImageInput(data=d) for d in images])
    try:
        return len((await stub.Embed(request)).embeddings)
    except grpc.aio.AioRpcError as exc:
        return exc


def images(image_dir) -> list[bytes]:
    return [(image_dir / name).read_bytes() for name in ("a.png", "b.jpg", "c.png")]


def test_a_failed_forward_fails_its_images_cleanly_and_the_encoder_keeps_serving(
    encoder, monkeypatch, image_dir
):
    forward = failing(encoder, monkeypatch, RuntimeError("boom"))
    a, b, c = images(image_dir)

    async def body(stub, channel):
        forward.remaining = 1
        failed = await embed(stub, a)
        forward.remaining = 2  # the batch fails, then its first image alone: the others still encode
        batch = await embed(stub, b, c)
        return failed, batch, await health_status(channel, SERVICE), await embed(stub, a, b, c)

    failed, batch, health_after, served = serve(encoder, body)
    assert_unavailable(failed, "vision encoder's forward failed", "RuntimeError: boom")
    assert_unavailable(batch, "RuntimeError: boom")  # a request fails with any of its images
    assert health_after == SERVING and encoder.is_alive()
    assert served == 3


def test_forward_failures_in_a_row_fail_the_encoder_and_health_turns_not_serving(
    encoder, monkeypatch, image_dir
):
    forward = failing(encoder, monkeypatch, RuntimeError("stuck"))
    a, b, c = images(image_dir)

    async def body(stub, channel):
        forward.remaining = 2
        first = [await embed(stub, image) for image in (a, b)]
        served = await embed(stub, c)  # a success resets the count
        forward.remaining = 3
        failed = [await embed(stub, image) for image in (a, b, c)]
        down = await wait_for_status(channel, SERVICE, NOT_SERVING)
        return first, served, failed, down, await embed(stub, a)

    first, served, failed, down, refused = serve(encoder, body)
    for result in first + failed:
        assert_unavailable(result, "RuntimeError: stuck")
    assert served == 1
    assert down == NOT_SERVING and not encoder.is_alive()
    assert_unavailable(refused, "needs a restart", "3 consecutive encoder forward failures")


def test_a_cuda_error_fails_the_encoder_at_once(encoder, monkeypatch, image_dir):
    forward = failing(encoder, monkeypatch, RuntimeError("CUDA error: device-side assert triggered"))
    a, _, _ = images(image_dir)

    async def body(stub, channel):
        forward.remaining = 1
        failed = await embed(stub, a)
        return failed, await wait_for_status(channel, SERVICE, NOT_SERVING), await embed(stub, a)

    failed, down, refused = serve(encoder, body)
    assert_unavailable(failed, "CUDA error")
    assert down == NOT_SERVING
    assert_unavailable(refused, "needs a restart", "fatal encoder forward failure")
