"""Hash-only requests and the gateway client's resend of bytes on NOT_FOUND, through real VisionService
servers: one, and two replicas behind one client."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from gateway.clients import GrpcVisionClient
from mmserve.grpc_util import start_server
from mmserve.images import content_hash
from mmserve.proto import vision_pb2_grpc
from mmserve.wire import ImageInput
from tests.helpers import serve_vision
from tests.service.test_vision_batching import IMAGES, SERVICE, count, embed_request
from vision_service.server import VisionServicer


def test_hash_only_requests_hit_or_get_not_found(make_encoder):
    encoder = make_encoder()

    async def body(stub, address):
        with pytest.raises(grpc.aio.AioRpcError) as miss:
            await stub.Embed(embed_request(IMAGES[3], hash_only=True))
        await stub.Embed(embed_request(IMAGES[3]))
        hit = await stub.Embed(embed_request(IMAGES[3], hash_only=True))
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.Embed(embed_request(IMAGES[4], hashes={0: content_hash(IMAGES[3])}))
        return miss.value, hit, forged.value

    miss, hit, forged = serve_vision(encoder, body)
    assert miss.code() == grpc.StatusCode.NOT_FOUND and "[0]" in miss.details()
    assert hit.embeddings[0].content_hash == content_hash(IMAGES[3])
    # A client cannot plant an embedding under another image's hash.
    assert forged.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in forged.details()


def test_gateway_client_sends_hashes_and_resends_bytes_on_not_found(make_encoder):
    encoder = make_encoder(cache_bytes=0)  # holds nothing: every hash-only call misses

    async def body(stub, address):
        client = GrpcVisionClient(address, 64 << 20, 30)
        images = [ImageInput(IMAGES[5], content_hash(IMAGES[5]))]
        first = await client.embed(images, "a")
        second = await client.embed(images, "b")  # tries the hash only, gets NOT_FOUND, resends
        await client.close()
        return first, second, client.resends

    first, second, resends = serve_vision(encoder, body)
    assert resends == 1
    assert torch.equal(first[0].embedding, second[0].embedding)


def serve_replicas(encoders, body):
    """Run `await body(addresses)` against one real VisionService server per encoder (replicas)."""

    async def go():
        servers = []
        try:
            for encoder in encoders:
                servicer = VisionServicer(encoder)
                servers.append(
                    await start_server(
                        lambda s, servicer=servicer: vision_pb2_grpc.add_VisionServiceServicer_to_server(
                            servicer, s
                        ),
                        SERVICE,
                        "127.0.0.1",
                        0,
                        64 << 20,
                    )
                )
            return await body([f"127.0.0.1:{port}" for _, _, port in servers])
        finally:
            for server, _, _ in servers:
                await server.stop(0)

    return asyncio.run(go())


def test_hash_only_memory_is_kept_per_replica(make_encoder):
    replicas = [make_encoder(), make_encoder()]  # two caches, one client balancing over both
    image = ImageInput(IMAGES[5], content_hash(IMAGES[5]))

    def served(encoder):
        return count(encoder, "encoded") + count(encoder, "cached")

    async def body(addresses):
        client = GrpcVisionClient("ipv4:" + ",".join(addresses), 64 << 20, 30)
        answers = []
        # round_robin reaches the second replica within a few calls; then a few more, hash-only to both
        while len(answers) < 40 and (not all(served(r) for r in replicas) or len(answers) < 8):
            answers.append((await client.embed([image], f"r{len(answers)}"))[0])
        await client.close()
        return answers, client.resends, len(client.replicas)

    answers, resends, known = serve_replicas(replicas, body)
    assert known == 2 and all(served(r) for r in replicas)
    # The replica that never saw the bytes answered NOT_FOUND once; from then on the client sent it the
    # bytes until it held the image (a memory per client resends about every other call).
    assert resends == 1
    assert [count(r, "encoded") for r in replicas] == [1, 1]
    assert all(torch.equal(a.embedding, answers[0].embedding) for a in answers)
    assert {a.content_hash for a in answers} == {image.content_hash}
