"""Clients of the vision and LLM services: over gRPC (the gateway) or in-process (the Python API).

Both kinds speak the domain types of mmserve.wire and raise the domain errors of mmserve.errors,
so the serving code above them is one code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mmserve.errors import MMServeError, NotFoundError, UnavailableError, error_for_grpc_code
from mmserve.grpc_util import channel_options
from mmserve.internal_auth import call_metadata
from mmserve.proto import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from mmserve.resend import CACHE_ID_METADATA, ReplicaMemory
from mmserve.wire import GenerateOutput, GenerateRequest, ImageFeatures, ImageInput, LLMInfo, PixelLimits
from mmserve.wire_pb import (
    embed_request_to_pb,
    generate_output_from_pb,
    generate_request_to_pb,
    image_features_from_pb,
    llm_info_from_pb,
)


def _domain_error(exc: grpc.aio.AioRpcError, service: str) -> MMServeError:
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # a deployment error, not the client's: say whose
        return UnavailableError(
            f"{service} service refused the gateway's internal token ({exc.details()}): "
            "MMSERVE_INTERNAL_TOKEN / MMSERVE_INTERNAL_TOKEN_FILE must be the same for all three services"
        )
    kind = error_for_grpc_code(exc.code().name)
    if kind is UnavailableError:
        return UnavailableError(f"{service} service is unavailable ({exc.details()})")
    if kind is MMServeError:
        return MMServeError(f"{service} service failed: {exc.code().name}: {exc.details()}")
    return kind(exc.details())


def _cache_id(metadata: grpc.aio.Metadata | None) -> str:
    """The answering replica's cache id ("" from a replica that sends none)."""
    value = metadata.get(CACHE_ID_METADATA, "") if metadata is not None else ""
    return value if isinstance(value, str) else value.decode()


def _channel(address: str, max_message_bytes: int) -> grpc.aio.Channel:
    # round_robin spreads calls over every address a name resolves to (replicas behind one DNS name).
    options = channel_options(max_message_bytes) + [("grpc.lb_policy_name", "round_robin")]
    return grpc.aio.insecure_channel(address, options=options)


class GrpcVisionClient:
    """Sends only the hash of images the vision replicas were recently given (they cache embeddings by
    content); a replica that no longer holds one answers NOT_FOUND and the bytes are resent.

    `address` may name several replicas (`dns:///name:port`, `ipv4:a:p,b:p`): calls are spread over
    them, and what each was given is remembered per replica (mmserve.resend.ReplicaMemory)."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        timeout_s: float,
        remember: int = 4096,
        token: str | None = None,
    ):
        """`timeout_s`: each call's deadline; `token`: the services' shared secret, sent on every call."""
        self._channel = _channel(address, max_message_bytes)
        self._stub = vision_pb2_grpc.VisionServiceStub(self._channel)
        self._timeout = timeout_s
        self._metadata = call_metadata(token)
        self.replicas = ReplicaMemory(remember)
        self.resends = 0

    async def _call(
        self, images: list[ImageInput], request_id: str, pixels: PixelLimits | None
    ) -> tuple[list[ImageFeatures], str]:
        """The features of `images`, and the cache id of the replica that answered."""
        request = embed_request_to_pb(images, request_id, pixels)
        call = self._stub.Embed(request, timeout=self._timeout, metadata=self._metadata)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            error = _domain_error(exc, "vision")
            if isinstance(error, NotFoundError):
                self.replicas.not_found(_cache_id(exc.initial_metadata()))
            raise error from None
        cache_id = _cache_id(await call.initial_metadata())
        return [image_features_from_pb(e) for e in response.embeddings], cache_id

    async def embed(
        self, images: list[ImageInput], request_id: str, pixels: PixelLimits | None = None
    ) -> list[ImageFeatures]:
        """`pixels`: per-request resize bounds (dynamic-resolution families); None = the service's default."""
        sent = [(image.content_hash, pixels or PixelLimits()) for image in images]
        slim = [
            ImageInput(b"", image.content_hash) if self.replicas.held_everywhere(key) else image
            for image, key in zip(images, sent, strict=True)
        ]
        try:
            features, cache_id = await self._call(slim, request_id, pixels)
        except NotFoundError:
            self.resends += 1
            features, cache_id = await self._call(images, request_id, pixels)
        self.replicas.answered(cache_id, sent)
        return features

    async def model_info(self) -> vision_pb2.VisionModelInfo:
        try:
            request = vision_pb2.VisionModelInfoRequest()
            return await self._stub.GetModelInfo(request, timeout=10, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, "vision") from None

    async def close(self) -> None:
        await self._channel.close()


class GrpcLLMClient:
    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        generate_timeout_s: float | None = None,
        token: str | None = None,
    ):
        """`generate_timeout_s`: each generation's deadline (None: none; the client going away or the
        gateway's own request timeout cancels it); `token`: the services' shared secret."""
        self._channel = _channel(address, max_message_bytes)
        self._stub = llm_pb2_grpc.LLMServiceStub(self._channel)
        self._generate_timeout = generate_timeout_s
        self._metadata = call_metadata(token)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        pb = generate_request_to_pb(request)
        call = self._stub.Generate(pb, timeout=self._generate_timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield generate_output_from_pb(message)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(exc, "llm") from None
        finally:
            call.cancel()  # no-op when finished; aborts the sequence when the consumer went away

    async def model_info(self) -> LLMInfo:
        try:
            request = llm_pb2.LLMModelInfoRequest()
            return llm_info_from_pb(
                await self._stub.GetModelInfo(request, timeout=10, metadata=self._metadata)
            )
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
