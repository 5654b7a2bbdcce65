"""The LLM service defends itself: any gRPC client can reach it, so nothing in a GenerateRequest is
trusted. A real LLMService server on loopback (in this process, so the engine can be inspected),
a tiny checkpoint, and a real client sending raw protobuf.

- Prefix-cache poisoning: garbage embeddings under a real image's content_hash neither hit nor
  change that image's cached KV (keys are digests of the embedding bytes received).
- Non-finite embeddings and every out-of-range field are INVALID_ARGUMENT naming the field.
- Bad requests, alone or in a crowd, leave a concurrent good request's tokens unchanged.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.engine.model_runner import kv_cache_bytes_per_block
from llm_service.models import load_language_model
from mmserve.proto import llm_pb2
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams
from tests.llm_requests import GARBAGE, REAL, ROWS, H, embedding, generate_pb, malformed, prompt
from tests.service.test_llm_service import with_server as serve_llm

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name
BLOCK = 4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine(load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))), block_size=BLOCK)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def uncached(tiny_checkpoint):
    """The same model without a prefix cache: the reference answers."""
    engine = Engine(
        load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))),
        block_size=BLOCK,
        enable_prefix_caching=False,
    )
    yield engine
    engine.stop()


def with_server(engine, body):
    """`body(stub)` against a fresh LLMService server on loopback (test_llm_service's helper)."""
    return serve_llm(engine, lambda stub, channel, address: body(stub))


async def call(stub, request) -> tuple[list[int], llm_pb2.Usage]:
    tokens, usage = [], None
    async for message in stub.Generate(request):
        tokens += message.token_ids
        if message.HasField("usage"):
            usage = message.usage
    return tokens, usage


async def refused(stub, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(stub, request)
    return info.value.code(), info.value.details()


def reference(uncached, ids, spans, max_new_tokens=8) -> list[int]:
    async def go():
        request = GenerateRequest(
            "ref",
            list(ids),
            [ImageSpan(o, t, h) for o, t, h in spans],
            SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True),
        )
        return [t async for out in uncached.generate(request) for t in out.token_ids]

    return asyncio.run(go())


def prefix_hits(engine) -> int:
    return engine.stats.prefix_hits


# ---- prefix-cache poisoning ---------------------------------------------------------------------


def test_garbage_under_a_real_images_hash_does_not_hit_or_change_its_kv(engine, uncached):
    ids = prompt(engine)
    real = [(2, embedding(engine, REAL), H)]
    garbage = [(2, embedding(engine, GARBAGE), H)]  # same hash H, same token ids

    async def body(stub):
        first = await call(stub, generate_pb(ids, real))
        hits_before = prefix_hits(engine)
        poison = await call(stub, generate_pb(ids, garbage, request_id="attacker"))
        hits_after_poison = prefix_hits(engine)
        again = await call(stub, generate_pb(ids, real))
        return first, poison, hits_before, hits_after_poison, again

    first, poison, hits_before, hits_after_poison, again = with_server(engine, body)
    expected = reference(uncached, ids, real)
    assert first[0] == expected and first[1].cached_tokens == 0
    # The garbage request found none of A's blocks: nothing cached, the hit counter did not move,
    # and its answer is its own (garbage in, other tokens out).
    assert poison[1].cached_tokens == 0
    assert hits_after_poison == hits_before
    assert poison[0] == reference(uncached, ids, garbage) != expected
    # A true repeat of A hits every full prompt block, and answers as before.
    assert again[0] == expected
    assert again[1].cached_tokens == len(ids) // BLOCK * BLOCK
    assert prefix_hits(engine) == hits_after_poison + again[1].cached_tokens


def test_garbage_sent_first_does_not_become_the_real_images_kv(engine, uncached):
    # The attack in its useful order: poison first, then the victim's request. Another prompt head,
    # so the previous test's blocks play no part.
    ids = prompt(engine, head=(1, 50))
    real = [(2, embedding(engine, REAL), H)]
    garbage = [(2, embedding(engine, GARBAGE), H)]

    async def body(stub):
        poison = await call(stub, generate_pb(ids, garbage, request_id="attacker"))
        victim = await call(stub, generate_pb(ids, real))
        return poison, victim

    poison, victim = with_server(engine, body)
    assert poison[1].cached_tokens == 0
    assert victim[1].cached_tokens == 0
    assert victim[0] == reference(uncached, ids, real) != poison[0]


def test_the_same_embedding_under_another_hash_still_shares_kv(engine):
    # Keys are of what is computed with: the same embedding is the same prompt, whatever its name.
    ids = prompt(engine, head=(1, 60))
    image = embedding(engine, 7)

    async def body(stub):
        first = await call(stub, generate_pb(ids, [(2, image, "a" * 64)]))
        second = await call(stub, generate_pb(ids, [(2, image.clone(), "b" * 64)]))
        return first, second

    first, second = with_server(engine, body)
    assert first[1].cached_tokens == 0
    assert second[1].cached_tokens == len(ids) // BLOCK * BLOCK
    assert second[0] == first[0]


# ---- non-finite embeddings ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_embeddings_are_invalid_argument(engine, value, dtype):
    ids = prompt(engine, rows=2) + [engine.info().image_token_id] * 3
    poisoned = embedding(engine, 3, rows=3).to(dtype)
    poisoned[1, 5] = value
    spans = [(2, embedding(engine, 3, rows=2).to(dtype), H), (len(ids) - 3, poisoned, H)]

    code, details = with_server(engine, lambda stub: refused(stub, generate_pb(ids, spans)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image span 1: embedding contains non-finite values" in details


# ---- the malformed corpus -----------------------------------------------------------------------
def test_a_corpus_of_malformed_requests_is_invalid_argument_then_a_normal_request_is_served(engine, uncached):
    corpus = malformed(engine)
    assert len(corpus) >= 20
    ids, real = prompt(engine, head=(1, 70)), [(2, embedding(engine, REAL), H)]

    async def body(stub):
        answers = {needle: await refused(stub, request) for needle, request in corpus.items()}
        return answers, await call(stub, generate_pb(ids, real))

    answers, normal = with_server(engine, body)
    for needle, (code, details) in answers.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (needle, code, details)
        assert needle in details, (needle, details)
    assert normal[0] == reference(uncached, ids, real)
    assert engine.is_alive()


# ---- one bad request never harms another --------------------------------------------------------


@pytest.fixture(scope="module")
def small(tiny_checkpoint):
    """An engine with 64 KV blocks: the crowd below recycles them (and the decode staging rows), so
    whatever a bad request left in freed KV is what the good request's blocks then hold."""
    model = load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))
    engine = Engine(model, block_size=BLOCK, kv_cache_bytes=64 * kv_cache_bytes_per_block(model, BLOCK))
    assert engine.block_manager.num_blocks == 64
    yield engine
    engine.stop()


def test_a_good_request_is_unchanged_by_a_crowd_of_bad_ones(small, uncached):
    """A long greedy generation runs while malformed requests, NaN embeddings, garbage under its
    own image's hash and extreme-but-allowed embeddings arrive around it, and some streams are
    cancelled midway. Its tokens are those of a quiet engine without a prefix cache. (Without the
    non-finite check, the NaN request of the first wave makes it fail: 0 x NaN in masked KV.)"""
    engine = small
    ids, real = prompt(engine, head=(1, 80)), [(2, embedding(engine, REAL), H)]
    new_tokens = 48
    expected = reference(uncached, ids, real, max_new_tokens=new_tokens)
    corpus = list(malformed(engine).values())
    hidden = engine.info().hidden_size
    extreme = torch.full((ROWS, hidden), 65504.0)
    extreme[::2] = -65504.0
    hostile_but_valid = [
        generate_pb(ids, [(2, embedding(engine, GARBAGE), H)], max_new_tokens=new_tokens),
        generate_pb(ids, [(2, extreme, H)], max_new_tokens=new_tokens),
        generate_pb(ids, [(2, torch.zeros(ROWS, hidden), H)], temperature=1.5, top_k=3, seed=1),
    ]

    async def cancelled(stub, request):
        stream = stub.Generate(request)
        async for _ in stream:
            break
        stream.cancel()

    def crowd(stub):
        waves = [refused(stub, request) for request in corpus]
        waves += [call(stub, request) for request in hostile_but_valid]
        waves += [cancelled(stub, generate_pb(ids, [(2, extreme, H)], max_new_tokens=100))]
        return asyncio.gather(*waves, return_exceptions=True)

    async def body(stub):
        # A first wave alone (whatever it leaves in freed KV blocks, the good request reuses them),
        # then the good request with a second wave around it.
        first_wave = await crowd(stub)
        good = asyncio.create_task(call(stub, generate_pb(ids, real, max_new_tokens=new_tokens)))
        await asyncio.sleep(0)
        second_wave = await crowd(stub)
        return await good, first_wave + second_wave

    good, bad = with_server(engine, body)
    assert good[0] == expected
    assert not [b for b in bad if isinstance(b, BaseException)]
    refusals = bad[: len(corpus)] + bad[len(bad) // 2 : len(bad) // 2 + len(corpus)]
    assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in refusals), refusals
    assert engine.is_alive()
    for _ in range(100):  # the cancelled stream's blocks are freed at the worker's next step
        if engine.num_running() == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.num_free_blocks() == engine.block_manager.num_blocks
    # and afterwards the engine answers exactly as before
    assert (
        with_server(engine, lambda stub: call(stub, generate_pb(ids, real, max_new_tokens=new_tokens)))[0]
        == expected
    )


def test_a_nan_request_leaves_nothing_behind_for_the_next_one(small, uncached):
    # Before the check, a NaN embedding was served, its NaN KV stayed in recycled blocks / staging
    # rows, and the next text-only request read it under its attention mask (0 x NaN = NaN): its
    # tokens turned into zeros ([28, 0, 0, ...] instead of [28, 185, 56, ...]).
    engine = small
    ids = [1, 50, 51, 52, 53]
    poisoned = [(2, torch.full((ROWS, engine.info().hidden_size), float("nan")), H)]

    async def body(stub):
        try:
            nan = await call(stub, generate_pb(prompt(engine, head=(1, 90)), poisoned, max_new_tokens=16))
        except grpc.aio.AioRpcError as exc:
            nan = exc.code(), exc.details()
        return nan, await call(stub, generate_pb(ids, max_new_tokens=12))

    nan, (tokens, _) = with_server(engine, body)
    assert tokens == reference(uncached, ids, [], max_new_tokens=12)
    assert nan[0] == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in nan[1]
