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
from functools import partial

import grpc
import pytest
import torch

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.engine.model_runner import kv_cache_bytes_per_block
from llm_service.models import load_language_model
from mmserve.proto import llm_pb2
from mmserve.tensor_codec import tensor_to_pb
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams
from tests.service.test_llm_service import with_server as serve_llm

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name
BLOCK = 4
ROWS = 6  # image rows; with BLOCK 4 the image starts in block 0, so no block is free of it
H = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # the real image's hash


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


def embedding(engine, seed: int, rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, engine.info().hidden_size, generator=torch.Generator().manual_seed(seed))


REAL = 1  # seeds of the "real" image embedding E and of the garbage G
GARBAGE = 2


def prompt(engine, head: tuple[int, ...] = (1, 40), rows: int = ROWS) -> list[int]:
    return [*head, *[engine.info().image_token_id] * rows, 41, 42]


def generate_pb(ids, spans=(), request_id="req-1", **sampling) -> llm_pb2.GenerateRequest:
    """A GenerateRequest built field by field, as any client could. spans: (offset, tensor, hash)."""
    params = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True, **sampling}
    return llm_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=ids,
        images=[
            llm_pb2.ImageSpan(offset=o, length=len(t), embedding=tensor_to_pb(t), content_hash=h)
            for o, t, h in spans
        ],
        sampling=llm_pb2.SamplingParams(**params),
    )


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


def malformed(engine) -> dict[str, llm_pb2.GenerateRequest]:
    """needle -> a request that must be INVALID_ARGUMENT with `needle` in its message."""
    img = engine.info().image_token_id
    return {
        **_malformed_ids(engine),
        **_malformed_spans(engine),
        **_malformed_sampling(engine),
        # and a correct request behind a wrong hash-less twin: placeholders without a span
        "prompt has 1 image placeholder tokens but the image spans cover 0": generate_pb([1, img, 2]),
    }


def _with_span(ids: list[int], real: torch.Tensor, **fields) -> llm_pb2.GenerateRequest:
    """A request with one image span of `real` at offset 2, with `fields` of the span overwritten."""
    request = generate_pb(ids, [(2, real, H)])
    span = request.images[0]
    for name, value in fields.items():
        if name == "embedding":
            span.embedding.CopyFrom(value)
        elif name == "grid_thw":
            span.grid_thw[:] = value
        else:
            setattr(span, name, value)
    return request


def _bad_tensor(real: torch.Tensor, **fields):
    """`real` on the wire, with `fields` of the tensor message overwritten."""
    message = tensor_to_pb(real)
    for name, value in fields.items():
        if name == "shape":
            message.shape[:] = value
        else:
            setattr(message, name, value)
    return message


def _malformed_ids(engine) -> dict[str, llm_pb2.GenerateRequest]:
    vocab = engine.model.vocab_size
    return {
        # request_id
        "request_id is empty": generate_pb([1, 2], request_id=""),
        "request_id has 300 characters": generate_pb([1, 2], request_id="x" * 300),
        "request_id contains non-printable": generate_pb([1, 2], request_id="a\r\nforged log line"),
        # token_ids
        "token_ids is empty": generate_pb([]),
        f"token_ids: token id {vocab} is outside the vocabulary": generate_pb([1, vocab]),
        "token_ids: token id -5 is outside the vocabulary": generate_pb([1, -5]),
        f"token_ids: prompt has {engine.max_model_len} tokens": generate_pb([1] * engine.max_model_len),
    }


def _malformed_spans(engine) -> dict[str, llm_pb2.GenerateRequest]:
    ids, real, hidden = prompt(engine), embedding(engine, REAL), engine.info().hidden_size
    half = embedding(engine, 4, rows=3)
    with_span, bad_tensor = partial(_with_span, ids, real), partial(_bad_tensor, real)
    return {
        # image spans: placement
        "image span 0: offset -1 is negative": with_span(offset=-1),
        "image span 0 has length 0": with_span(length=0),
        "image span 0: length 5 differs from its 6 embedding rows": with_span(length=5),
        "image span 0 [5, 11) exceeds the 10 prompt tokens": with_span(offset=5),
        "image span 0 covers tokens other than the image placeholder": with_span(offset=1),
        "image spans cover 0": generate_pb(ids),
        "image span 1: offset 4 overlaps or precedes": generate_pb(ids, [(2, half, H), (4, half, H)]),
        "image span 1: offset 2 overlaps or precedes": generate_pb(ids, [(5, half, H), (2, half, H)]),
        # image spans: the embedding tensor
        f"image span 0: embedding shape [6, {hidden + 1}] is not [N, {hidden}]": with_span(
            embedding=tensor_to_pb(torch.zeros(ROWS, hidden + 1))
        ),
        f"image span 0: embedding shape [6, {hidden}, 1] is not": with_span(
            embedding=tensor_to_pb(torch.zeros(ROWS, hidden, 1))
        ),
        "image span 0: embedding dtype int64 is not allowed": with_span(
            embedding=tensor_to_pb(torch.zeros(ROWS, hidden, dtype=torch.int64))
        ),
        "image span 0: embedding: unsupported tensor dtype 'complex64'": with_span(
            embedding=bad_tensor(dtype="complex64")
        ),
        "image span 0: embedding: tensor of shape": with_span(embedding=bad_tensor(data=b"\0" * 10)),
        "image span 0: embedding: tensor shape [6, -64] has a negative dimension": with_span(
            embedding=bad_tensor(shape=[6, -64])
        ),
        "image span 0: embedding values must be within": with_span(
            embedding=tensor_to_pb(torch.full((ROWS, hidden), 1e9))
        ),
        "image span 0: embedding contains non-finite values": with_span(
            embedding=tensor_to_pb(torch.full((ROWS, hidden), float("nan")))
        ),
        "image span 0: content_hash has 1000 characters": with_span(content_hash="f" * 1000),
        "image span 0: grid_thw [1, 2] must be empty or three": with_span(grid_thw=[1, 2]),
        "image span 0: grid_thw [1, 0, 6] must be empty or three": with_span(grid_thw=[1, 0, 6]),
    }


def _malformed_sampling(engine) -> dict[str, llm_pb2.GenerateRequest]:
    vocab = engine.model.vocab_size
    return {
        # sampling
        "temperature must be finite and >= 0, got -1": generate_pb([1, 2], temperature=-1.0),
        "temperature must be finite and >= 0, got nan": generate_pb([1, 2], temperature=float("nan")),
        "temperature must be finite and >= 0, got inf": generate_pb([1, 2], temperature=float("inf")),
        "top_p must be in [0, 1]": generate_pb([1, 2], top_p=1.5),
        "top_k must be -1, 0 (both off) or positive": generate_pb([1, 2], top_k=-2),
        "min_p must be in [0, 1]": generate_pb([1, 2], min_p=float("nan")),
        "repetition_penalty must be finite and > 0, got -1": generate_pb([1, 2], repetition_penalty=-1.0),
        "repetition_penalty must be finite and > 0, got inf": generate_pb(
            [1, 2], repetition_penalty=float("inf")
        ),
        "presence_penalty must be in [-2, 2]": generate_pb([1, 2], presence_penalty=2.5),
        "frequency_penalty must be in [-2, 2]": generate_pb([1, 2], frequency_penalty=float("-inf")),
        "logprobs must be in [0, 20], got 21": generate_pb([1, 2], logprobs=21),
        "logprobs must be in [0, 20], got -1": generate_pb([1, 2], logprobs=-1),
        "max_new_tokens must be >= 1, got 0": generate_pb([1, 2], max_new_tokens=0),
        "max_new_tokens must be >= 1, got -3": generate_pb([1, 2], max_new_tokens=-3),
        "min_new_tokens must be >= 0": generate_pb([1, 2], min_new_tokens=-1),
        f"stop_token_ids must be in [0, {vocab})": generate_pb([1, 2], stop_token_ids=[5, vocab]),
        "stop_token_ids has 1025 ids; at most 1024": generate_pb([1, 2], stop_token_ids=[5] * 1025),
    }


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
