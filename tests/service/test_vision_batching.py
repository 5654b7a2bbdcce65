"""Cross-request batching, the embedding cache, coalescing and deadlines, through a real VisionService
gRPC server (hash-only requests and resends: test_vision_resend.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from mmserve.images import content_hash
from mmserve.proto import vision_pb2
from mmserve.tensor_codec import tensor_from_pb
from mmserve.wire import ImageFeatures, PixelLimits
from tests.helpers import make_image, serve_vision
from vision_service.cache import EmbeddingCache, EmbeddingKey

SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
IMAGES = [
    make_image(w, h, seed=s)
    for s, (w, h) in enumerate([(80, 60), (50, 90), (120, 120), (33, 200), (64, 64), (300, 40)])
]


def count(encoder, outcome: str) -> float:
    """Images that ended with `outcome`; fails on an outcome the service does not count (renamed?)."""
    value = encoder.metrics.registry.get_sample_value("mmserve_vision_images_total", {"outcome": outcome})
    assert value is not None, f"the vision service counts no images with outcome {outcome!r}"
    return value


def serve(encoder, body):
    return serve_vision(encoder, body)


def embed_request(*images: bytes, hash_only=False, hashes=None):
    return vision_pb2.EmbedRequest(
        images=[
            vision_pb2.ImageInput(
                data=b"" if hash_only else data, content_hash=(hashes or {}).get(i, content_hash(data))
            )
            for i, data in enumerate(images)
        ]
    )


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_batched_forward_equals_single_image_forward(make_encoder, mode):
    encoder = make_encoder(max_wait_ms=200, max_batch_size=8, cache_bytes=0, preprocess_mode=mode)

    async def body(stub, address):
        replies = await asyncio.gather(*(stub.Embed(embed_request(img)) for img in IMAGES))
        return [tensor_from_pb(r.embeddings[0].embedding) for r in replies]

    batched = serve(encoder, body)
    sizes = encoder.metrics.registry.get_sample_value("mmserve_vision_batch_size_sum")
    forwards = encoder.metrics.registry.get_sample_value("mmserve_vision_batch_size_count")
    assert sizes == len(IMAGES) and forwards < len(IMAGES), "the requests should have shared forwards"
    single = make_encoder(max_batch_size=1, cache_bytes=0)

    async def one_by_one(stub, address):
        return [
            tensor_from_pb((await stub.Embed(embed_request(img))).embeddings[0].embedding) for img in IMAGES
        ]

    for got, want in zip(batched, serve(single, one_by_one), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_identical_bytes_encode_once_and_new_bytes_encode_again(make_encoder):
    encoder = make_encoder()

    async def body(stub, address):
        first = await stub.Embed(embed_request(IMAGES[0]))
        again = await stub.Embed(embed_request(IMAGES[0]))  # e.g. the same picture behind another url
        changed = await stub.Embed(embed_request(IMAGES[1]))  # e.g. the same url, new content
        return first, again, changed

    first, again, changed = serve(encoder, body)
    assert count(encoder, "encoded") == 2 and count(encoder, "cached") == 1
    assert first.embeddings[0].embedding.data == again.embeddings[0].embedding.data
    assert first.embeddings[0].embedding.data != changed.embeddings[0].embedding.data


def test_concurrent_identical_misses_are_coalesced(make_encoder):
    encoder = make_encoder(max_wait_ms=50)

    async def body(stub, address):
        return await asyncio.gather(*(stub.Embed(embed_request(IMAGES[2])) for _ in range(6)))

    replies = serve(encoder, body)
    assert count(encoder, "encoded") == 1
    assert count(encoder, "coalesced") + count(encoder, "cached") == 5
    assert len({r.embeddings[0].embedding.data for r in replies}) == 1


def test_expired_requests_are_dropped_from_the_queue(make_encoder):
    encoder = make_encoder(max_batch_size=1, cache_bytes=0)
    original = encoder.run_batch

    def slow(items):
        time.sleep(0.3)
        return original(items)

    encoder.run_batch = slow  # make the queue build up so a short deadline passes while queued

    async def body(stub, address):
        busy = [asyncio.ensure_future(stub.Embed(embed_request(img))) for img in IMAGES[:3]]
        await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Embed(embed_request(IMAGES[5]), timeout=0.2)
        await asyncio.gather(*busy)
        await asyncio.sleep(0.1)
        return late.value

    late = serve(encoder, body)
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert count(encoder, "encoded") == 3  # the expired image never reached the encoder
    assert count(encoder, "expired") + count(encoder, "abandoned") == 1


def test_a_bad_image_fails_only_its_own_request(make_encoder):
    encoder = make_encoder(max_wait_ms=100)

    async def body(stub, address):
        return await asyncio.gather(
            stub.Embed(embed_request(IMAGES[0])),
            stub.Embed(embed_request(IMAGES[1], b"not an image")),
            stub.Embed(embed_request(IMAGES[2])),
            return_exceptions=True,
        )

    good, bad, also_good = serve(encoder, body)
    assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1" in bad.details()
    assert len(good.embeddings) == len(also_good.embeddings) == 1


def key(name: str) -> EmbeddingKey:
    return EmbeddingKey("model", name)


def test_cache_eviction_respects_the_byte_budget():
    def features(rows):
        return ImageFeatures(torch.zeros(rows, 8), "h")  # rows * 32 bytes

    cache = EmbeddingCache(budget_bytes=100 * 32)
    for i in range(5):
        cache.put(key(f"k{i}"), features(30))
        assert cache.bytes <= cache.budget
    assert len(cache) == 3 and key("k0") not in cache and key("k1") not in cache
    cache.get(key("k2"))  # k2 becomes the most recent; k3 is now the oldest
    cache.put(key("k5"), features(30))
    assert key("k2") in cache and key("k3") not in cache
    cache.put(key("huge"), features(101))  # larger than the whole budget: not cached, nothing evicted
    assert key("huge") not in cache and len(cache) == 3


def test_cache_keys_tell_models_and_resize_bounds_apart():
    cache = EmbeddingCache(budget_bytes=1 << 20)
    cache.put(EmbeddingKey("model", "h", PixelLimits(max_pixels=784)), ImageFeatures(torch.zeros(4, 8), "h"))
    assert EmbeddingKey("model", "h", PixelLimits(max_pixels=784)) in cache
    assert EmbeddingKey("model", "h") not in cache  # the checkpoint's bounds: another N_i
    assert EmbeddingKey("model", "h", PixelLimits(min_pixels=784)) not in cache
    assert EmbeddingKey("other model", "h", PixelLimits(max_pixels=784)) not in cache


def test_compiled_tower_matches_eager(make_encoder):
    eager = make_encoder(cache_bytes=0)
    compiled = make_encoder(cache_bytes=0, compile=True)

    async def body(stub, address):
        return [
            tensor_from_pb((await stub.Embed(embed_request(img))).embeddings[0].embedding)
            for img in IMAGES[:3]
        ]

    for got, want in zip(serve(compiled, body), serve(eager, body), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_failing_batch_is_retried_image_by_image(make_encoder):
    encoder = make_encoder(max_wait_ms=200, cache_bytes=0)
    original = encoder.run_batch
    poison = {}

    def flaky(items):
        if len(items) > 1 or any(torch.equal(item["pixel_values"], poison["pixel_values"]) for item in items):
            raise RuntimeError("simulated encoder failure")
        return original(items)

    encoder.run_batch = flaky

    async def body(stub, address):
        poison.update(await encoder.preprocess(IMAGES[1], {}))
        return await asyncio.gather(
            *(stub.Embed(embed_request(img)) for img in IMAGES[:3]), return_exceptions=True
        )

    good, bad, also_good = serve(encoder, body)
    assert len(good.embeddings) == len(also_good.embeddings) == 1  # the batch failed, these did not
    assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.UNAVAILABLE
    assert "the vision encoder's forward failed" in bad.details()


def test_batches_respect_the_patch_budget():
    from vision_service.batcher import EncodeBatcher, EncodeJob
    from vision_service.metrics import VisionMetrics

    sizes = []

    def run_batch(items):
        sizes.append(len(items))
        return [torch.zeros(1, 1) for _ in items]

    async def go():
        batcher = EncodeBatcher(
            run_batch, max_batch=16, max_wait_s=0.05, metrics=VisionMetrics(), max_batch_cost=25
        )
        loop = asyncio.get_running_loop()
        jobs = [EncodeJob(key(f"k{i}"), loop.create_future(), inputs={}, cost=10) for i in range(5)]
        # over budget alone: runs alone
        jobs.append(EncodeJob(key("big"), loop.create_future(), inputs={}, cost=100))
        for job in jobs:
            batcher.submit(job)
        await asyncio.gather(*(job.future for job in jobs))
        batcher.close()

    asyncio.run(go())
    assert sizes == [2, 2, 1, 1]
