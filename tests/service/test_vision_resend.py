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
from mmserve.wire import ImageInput, PixelLimits
from tests.helpers import make_image, serve_vision
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


def serve_replicas(encoders, body, pass_servers: bool = False):
    """Run `await body(addresses)` (with `pass_servers`: `body(addresses, servers)`) against one real
    VisionService server per encoder (replicas)."""

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
            addresses = [f"127.0.0.1:{port}" for _, _, port in servers]
            if pass_servers:
                return await body(addresses, [server for server, _, _ in servers])
            return await body(addresses)
        finally:
            for server, _, _ in servers:
                await server.stop(0)

    return asyncio.run(go())


MANY_IMAGES = [make_image(24 + i, 32, seed=100 + i) for i in range(16)]


def test_each_image_is_encoded_by_one_replica_and_then_goes_hash_only(make_encoder):
    """Two replicas behind one client: a request goes to the replica its first image hashes to, so
    every image is encoded once in all, both replicas serve, and repeats go hash-only without a resend."""
    replicas = [make_encoder(), make_encoder()]
    # 16 images: all of them hashing to one replica has odds of 2 in 65536
    images = [ImageInput(data, content_hash(data)) for data in MANY_IMAGES]

    async def body(addresses):
        client = GrpcVisionClient(",".join(addresses), 64 << 20, 30)
        answers = {}
        for round_ in range(3):
            for i, image in enumerate(images):
                answers.setdefault(i, []).append((await client.embed([image], f"r{round_}-{i}"))[0])
        hash_only = sum(
            client.replicas.holds(r.cache_id, (image.content_hash, PixelLimits()))
            for r in client.pool.replicas.values()
            for image in images
        )
        await client.close()
        return answers, client.resends, hash_only

    answers, resends, hash_only = serve_replicas(replicas, body)
    assert all(count(r, "encoded") for r in replicas), "one replica got no image: no balancing"
    assert sum(count(r, "encoded") for r in replicas) == len(images)  # no image encoded twice
    assert sum(count(r, "cached") for r in replicas) == 2 * len(images)  # rounds 2 and 3: cache hits
    assert resends == 0 and hash_only == len(images)
    for same in answers.values():
        assert all(torch.equal(a.embedding, same[0].embedding) for a in same)


def test_a_replica_that_goes_away_leaves_the_pool_and_its_images_go_elsewhere(make_encoder):
    replicas = [make_encoder(), make_encoder()]
    images = [ImageInput(data, content_hash(data)) for data in IMAGES]

    async def body(addresses, servers):
        client = GrpcVisionClient(",".join(addresses), 64 << 20, 30)
        for i, image in enumerate(images):
            await client.embed([image], f"a{i}")
        await servers[0].stop(0)  # the first replica is gone; its images must reach the other
        again = [(await client.embed([image], f"b{i}"))[0] for i, image in enumerate(images)]
        states = client.pool.states()
        await client.close()
        return again, states

    again, states = serve_replicas(replicas, body, pass_servers=True)
    assert len(again) == len(images) and all(a.embedding.numel() for a in again)
    assert sorted(s.split(":")[0] for s in states.values()) == ["SERVING", "UNAVAILABLE"], states
    assert count(replicas[1], "encoded") + count(replicas[1], "cached") >= len(images)
