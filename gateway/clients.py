"""Clients of the vision and LLM services: over gRPC (the gateway) or in-process (the Python API).

Both kinds speak the domain types of mmserve.wire and raise the domain errors of mmserve.errors,
so the serving code above them is one code path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from mmserve.errors import MMServeError, NotFoundError, UnavailableError, error_for_grpc_code
from mmserve.grpc_util import channel_options
from mmserve.proto import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from mmserve.wire import (
    GenerateOutput,
    GenerateRequest,
    ImageFeatures,
    ImageInput,
    LLMInfo,
    PixelLimits,
    embed_request_to_pb,
    generate_output_from_pb,
    generate_request_to_pb,
    image_features_from_pb,
    llm_info_from_pb,
)


def _domain_error(exc: grpc.aio.AioRpcError, service: str) -> MMServeError:
    kind = error_for_grpc_code(exc.code().name)
    if kind is UnavailableError:
        return UnavailableError(f"{service} service is unavailable ({exc.details()})")
    if kind is MMServeError:
        return MMServeError(f"{service} service failed: {exc.code().name}: {exc.details()}")
    return kind(exc.details())


def _channel(address: str, max_message_bytes: int) -> grpc.aio.Channel:
    # round_robin spreads calls over every address a name resolves to (replicas behind one DNS name).
    options = channel_options(max_message_bytes) + [("grpc.lb_policy_name", "round_robin")]
    return grpc.aio.insecure_channel(address, options=options)


class GrpcVisionClient:
    """Sends only the hash of images the vision service was recently given (it caches embeddings by
    content); when the service no longer holds one it answers NOT_FOUND and the bytes are resent."""

    def __init__(self, address: str, max_message_bytes: int, timeout_s: float, remember: int = 4096):
        self._channel = _channel(address, max_message_bytes)
        self._stub = vision_pb2_grpc.VisionServiceStub(self._channel)
        self._timeout = timeout_s
        self._sent: OrderedDict[str, None] = OrderedDict()  # hashes the service has seen, LRU
        self._remember = remember
        self.resends = 0

    async def _call(
        self, images: list[ImageInput], request_id: str, pixels: PixelLimits | None
    ) -> list[ImageFeatures]:
        request = embed_request_to_pb(images, request_id, pixels)
        try:
            response = await self._stub.Embed(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, "vision") from None
        return [image_features_from_pb(e) for e in response.embeddings]

    async def embed(
        self, images: list[ImageInput], request_id: str, pixels: PixelLimits | None = None
    ) -> list[ImageFeatures]:
        """`pixels`: per-request resize bounds (dynamic-resolution families); None = the service's default."""
        slim = [ImageInput(b"", i.content_hash) if i.content_hash in self._sent else i for i in images]
        try:
            features = await self._call(slim, request_id, pixels)
        except NotFoundError:
            self.resends += 1
            features = await self._call(images, request_id, pixels)
        for image in images:
            self._sent[image.content_hash] = None
            self._sent.move_to_end(image.content_hash)
        while len(self._sent) > self._remember:
            self._sent.popitem(last=False)
        return features

    async def model_info(self) -> vision_pb2.VisionModelInfo:
        try:
            return await self._stub.GetModelInfo(vision_pb2.VisionModelInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, "vision") from None

    async def close(self) -> None:
        await self._channel.close()


class GrpcLLMClient:
    def __init__(self, address: str, max_message_bytes: int, timeout_s: float):
        self._channel = _channel(address, max_message_bytes)
        self._stub = llm_pb2_grpc.LLMServiceStub(self._channel)
        self._timeout = timeout_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        # No deadline: a generation may run long; the client going away cancels it instead.
        call = self._stub.Generate(generate_request_to_pb(request))
        try:
            async for message in call:
                yield generate_output_from_pb(message)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, "llm") from None
        finally:
            call.cancel()  # no-op when finished; aborts the sequence when the consumer went away

    async def model_info(self) -> LLMInfo:
        try:
            return llm_info_from_pb(await self._stub.GetModelInfo(llm_pb2.LLMModelInfoRequest(), timeout=10))
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, "llm") from None

    async def close(self) -> None:
        await self._channel.close()


class InProcessVisionClient:
    """Calls a VisionEncoder living in this process."""

    def __init__(self, encoder):
        self.encoder = encoder

    async def embed(
        self, images: list[ImageInput], request_id: str, pixels: PixelLimits | None = None
    ) -> list[ImageFeatures]:
        return await self.encoder.embed_async(images, pixels=pixels)

    async def close(self) -> None:
        pass


class InProcessLLMClient:
    """Calls an Engine living in this process."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        return self.engine.generate(request)

    async def model_info(self) -> LLMInfo:
        return self.engine.info()

    async def close(self) -> None:
        pass
