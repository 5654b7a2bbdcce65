"""Clients of the vision and LLM services: over gRPC (the gateway) or in-process (the Python API).

Both kinds speak the domain types of mmserve.wire and raise the domain errors of mmserve.errors,
so the serving code above them is one code path.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from gateway.replicas import Replica, ReplicaPool
from mmserve.errors import MMServeError, UnavailableError, error_for_grpc_code
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

T = TypeVar("T")


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


# What the LLM routing key reads of a prompt (gateway.replicas, "cache_aware"): its first block of tokens
# (the engine's default KV block), and the content hash of every image starting in its first
# IMAGE_WINDOW tokens, whose placeholder tokens are the same for every image. Requests that share a
# system prompt but not an image then spread over replicas by image: an image's KV is what is costly.
ROUTING_BLOCK_TOKENS = 16
ROUTING_IMAGE_WINDOW = 256


def routing_key(request: GenerateRequest) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b",".join(str(t).encode() for t in request.token_ids[:ROUTING_BLOCK_TOKENS]))
    for image in request.images:
        if image.offset < ROUTING_IMAGE_WINDOW:
            digest.update(b"|" + image.content_hash.encode())
    return digest.digest()


async def _retrying(pool: ReplicaPool, key: bytes | None, call: Callable[[Replica], Awaitable[T]]) -> T:
    """`call` on the replica chosen for `key`; a replica that cannot be reached (UNAVAILABLE) leaves the
    pool and the call goes to the next, until none is left (then the last error)."""
    tried: list[Replica] = []
    last: MMServeError | None = None  # the error of the last replica tried
    while True:
        try:
            replica = pool.choose(key, exclude=tried)
        except UnavailableError:
            if last is None:
                raise
            raise last from None
        with pool.call(replica):
            try:
                return await call(replica)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise _domain_error(exc, pool.service) from None
                pool.mark_failed(replica, f"UNAVAILABLE: {exc.details()}")
                tried.append(replica)
                last = _domain_error(exc, pool.service)


class GrpcVisionClient:
    """Sends only the hash of images the vision replica it calls was recently given (replicas cache
    embeddings by content); a replica that no longer holds one answers NOT_FOUND and the bytes are resent.

    `address` may name several replicas (gateway.replicas): a request goes to the replica its first
    image hashes to (so each image is encoded and cached once, by one replica) unless that one is
    overloaded, and what each replica was given is remembered per replica (mmserve.resend.ReplicaMemory)."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        timeout_s: float,
        remember: int = 4096,
        token: str | None = None,
        policy: str = "cache_aware",
    ):
        """`timeout_s`: each call's deadline; `token`: the services' shared secret, sent on every call."""
        self.pool = ReplicaPool("vision", address, max_message_bytes, policy=policy)
        self._timeout = timeout_s
        self._metadata = call_metadata(token)
        self.replicas = ReplicaMemory(remember)
        self.resends = 0

    async def _call(
        self, replica: Replica, images: list[ImageInput], request_id: str, pixels: PixelLimits | None
    ) -> list[ImageFeatures]:
        request = embed_request_to_pb(images, request_id, pixels)
        stub = vision_pb2_grpc.VisionServiceStub(replica.channel)
        call = stub.Embed(request, timeout=self._timeout, metadata=self._metadata)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                replica.cache_id = _cache_id(exc.initial_metadata())
                self.replicas.not_found(replica.cache_id)
            raise
        replica.cache_id = _cache_id(await call.initial_metadata())
        return [image_features_from_pb(e) for e in response.embeddings]

    async def embed(
        self, images: list[ImageInput], request_id: str, pixels: PixelLimits | None = None
    ) -> list[ImageFeatures]:
        """`pixels`: per-request resize bounds (dynamic-resolution families); None = the service's default."""
        sent = [(image.content_hash, pixels or PixelLimits()) for image in images]
        key = f"{sent[0][0]}|{sent[0][1]}".encode() if sent else None

        async def on(replica: Replica) -> list[ImageFeatures]:
            hash_only = [self.replicas.holds(replica.cache_id, item) for item in sent]
            slim = [
                ImageInput(b"", image.content_hash) if only else image
                for image, only in zip(images, hash_only, strict=True)
            ]
            try:
                features = await self._call(replica, slim, request_id, pixels)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or not any(hash_only):
                    raise
                self.resends += 1
                features = await self._call(replica, images, request_id, pixels)
            self.replicas.answered(replica.cache_id or "", sent)
            return features

        return await _retrying(self.pool, key, on)

    async def model_info(self) -> vision_pb2.VisionModelInfo:
        async def on(replica: Replica) -> vision_pb2.VisionModelInfo:
            stub = vision_pb2_grpc.VisionServiceStub(replica.channel)
            return await stub.GetModelInfo(
                vision_pb2.VisionModelInfoRequest(), timeout=10, metadata=self._metadata
            )

        return await _retrying(self.pool, None, on)

    async def close(self) -> None:
        await self.pool.close()


class GrpcLLMClient:
    """Generations over one or many LLM replicas (gateway.replicas): by default a request goes to a
    replica its routing key (routing_key) went to before, whose prefix cache likely holds its beginning."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        generate_timeout_s: float | None = None,
        token: str | None = None,
        policy: str = "cache_aware",
        max_imbalance: int = 8,
    ):
        """`generate_timeout_s`: each generation's deadline (None: none; the client going away or the
        gateway's own request timeout cancels it); `token`: the services' shared secret."""
        self.pool = ReplicaPool("llm", address, max_message_bytes, policy=policy, max_imbalance=max_imbalance)
        self._generate_timeout = generate_timeout_s
        self._metadata = call_metadata(token)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """The outputs of one generation. A replica that cannot be reached before it sent anything
        leaves the pool and the request goes to another; once outputs flowed, a failure ends it."""
        pb = generate_request_to_pb(request)
        key = routing_key(request)
        tried: list[Replica] = []
        last: MMServeError | None = None  # the error of the last replica tried
        while True:
            try:
                replica = self.pool.choose(key, exclude=tried)
            except UnavailableError:
                if last is None:
                    raise
                raise last from None
            with self.pool.call(replica):
                stub = llm_pb2_grpc.LLMServiceStub(replica.channel)
                call = stub.Generate(pb, timeout=self._generate_timeout, metadata=self._metadata)
                started = False
                try:
                    async for message in call:
                        started = True
                        yield generate_output_from_pb(message)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise _domain_error(exc, "llm") from None
                    self.pool.mark_failed(replica, f"UNAVAILABLE: {exc.details()}")
                    if started:
                        raise _domain_error(exc, "llm") from None
                    tried.append(replica)
                    last = _domain_error(exc, "llm")
                finally:
                    call.cancel()  # no-op when finished; aborts the sequence when the consumer went away

    async def model_info(self) -> LLMInfo:
        async def on(replica: Replica) -> LLMInfo:
            stub = llm_pb2_grpc.LLMServiceStub(replica.channel)
            request = llm_pb2.LLMModelInfoRequest()
            return llm_info_from_pb(await stub.GetModelInfo(request, timeout=10, metadata=self._metadata))

        return await _retrying(self.pool, None, on)

    async def close(self) -> None:
        await self.pool.close()


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
