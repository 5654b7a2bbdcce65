"""Property-based fuzzing of the gRPC services, which any client can reach: hostile `GenerateRequest`s
against one real LLMService server and hostile `EmbedRequest`s against one real VisionService server, both
on loopback over the tiny checkpoint (one server per service for the whole run, not one per example).

Requests are built field by field as any client could (tests/fuzz_grpc_requests.py): token ids (negative, huge, the placeholder id),
image spans (offsets, lengths, order), embedding tensors (dtype strings, shapes, byte lengths, NaN / inf /
huge values), sampling values (NaN, inf, out of range). Each call either streams a well-formed result or
fails with INVALID_ARGUMENT / RESOURCE_EXHAUSTED / OUT_OF_RANGE (vision: also NOT_FOUND), never INTERNAL or
UNKNOWN; afterwards each service still serves a normal request with the same answer as before the run
(nothing a hostile request did reached the KV cache, the prefix cache or the embedding cache). Bounded and
derandomized, so CI runs the same examples.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch
from hypothesis import event, given, settings

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from mmserve.grpc_util import channel_options
from mmserve.images import content_hash
from mmserve.proto import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from mmserve.tensor_codec import tensor_from_pb, tensor_to_pb
from mmserve.wire_pb import generate_request_from_pb
from tests.fuzz_grpc_requests import GOOD, MAX_MODEL_LEN, embed_request, generate_request
from tests.fuzz_settings import fuzz_settings
from tests.helpers import serve_vision
from tests.service.test_llm_service import with_server
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder

FUZZ = fuzz_settings(120)
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
CALL_TIMEOUT_S = 60  # a call that hangs fails as DEADLINE_EXCEEDED


# ---- the LLM service ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine(
        load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))),
        max_model_len=MAX_MODEL_LEN,
        block_size=4,
        max_waiting=8,
        kv_cache_bytes=1 << 20,  # 512 blocks of 4 tokens: plenty, and allocated in no time
    )
    yield engine
    engine.stop()


def check_generation(messages: list, request: llm_pb2.GenerateRequest, vocab: int) -> None:
    """A normal result: tokens in the vocabulary, logprobs where asked for, one finishing message with usage."""
    assert messages, "the stream ended without a message"
    *head, last = messages
    assert all(m.finish_reason == llm_pb2.FINISH_REASON_UNSPECIFIED for m in head)
    assert last.finish_reason in (llm_pb2.FINISH_REASON_STOP, llm_pb2.FINISH_REASON_LENGTH), last
    tokens = [t for m in messages for t in m.token_ids]
    assert all(0 <= t < vocab for t in tokens), tokens
    assert 1 <= len(tokens) <= request.sampling.max_new_tokens
    assert last.usage.prompt_tokens == len(request.token_ids)
    assert last.usage.completion_tokens == len(tokens)
    assert 0 <= last.usage.cached_tokens <= last.usage.prompt_tokens
    want = request.sampling.logprobs if request.sampling.HasField("logprobs") else None
    for m in messages:
        assert len(m.logprobs) == (0 if want is None else len(m.token_ids))
        for lp in m.logprobs:
            assert len(lp.top_token_ids) == len(lp.top_logprobs) == want
            assert all(0 <= t < vocab for t in lp.top_token_ids)
            assert not any(math.isnan(v) or v > 0 for v in [lp.logprob, *lp.top_logprobs]), lp


def reference_requests(image_id: int, hidden: int) -> list[llm_pb2.GenerateRequest]:
    """Greedy requests with logprobs, sent after the run: their answers must equal a clean engine's.
    The fuzzed engine has not seen them, so their prefill and decode use KV blocks the fuzz used before."""
    image = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    sampling = llm_pb2.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=3)
    return [
        llm_pb2.GenerateRequest(request_id="ref-text", token_ids=[1, 40, 41, 42, 43], sampling=sampling),
        llm_pb2.GenerateRequest(
            request_id="ref-image",
            token_ids=[1, 40, image_id, image_id, image_id, 41, 42],
            images=[llm_pb2.ImageSpan(offset=2, length=3, embedding=tensor_to_pb(image), content_hash="h")],
            sampling=sampling,
        ),
        llm_pb2.GenerateRequest(request_id="ref-long", token_ids=list(range(5, 45)), sampling=sampling),
    ]


def answers(messages) -> tuple[list[int], list[float]]:
    """(token ids, every logprob) of a stream of GenerateResponses or GenerateOutputs."""
    tokens, values = [], []
    for m in messages:
        tokens += list(m.token_ids)
        for lp in m.logprobs:
            top = (
                zip(lp.top_token_ids, lp.top_logprobs, strict=True)
                if hasattr(lp, "top_token_ids")
                else lp.top
            )
            values += [lp.logprob, *(v for _, v in top)]
    return tokens, values


def clean_answers(checkpoint, requests) -> list[tuple[list[int], list[float]]]:
    """The answers of an engine that served nothing else (and caches no prefix)."""
    clean = Engine(
        load_language_model(LLMConfig(checkpoint=str(checkpoint))),
        max_model_len=MAX_MODEL_LEN,
        block_size=4,
        kv_cache_bytes=1 << 20,
        enable_prefix_caching=False,
    )

    async def run(request):
        return answers([out async for out in clean.generate(generate_request_from_pb(request))])

    try:
        return [asyncio.run(run(request)) for request in requests]
    finally:
        clean.stop()


def test_fuzzed_generate_requests_never_fail_internally(engine, tiny_checkpoint):
    info = engine.info()
    vocab, image_id, hidden = engine.model.vocab_size, info.image_token_id, info.hidden_size
    references = reference_requests(image_id, hidden)
    expected = clean_answers(tiny_checkpoint, references)
    outcomes: dict[str, int] = {}

    def fuzz(address: str):
        channel = grpc.insecure_channel(address, options=channel_options(64 << 20))
        stub = llm_pb2_grpc.LLMServiceStub(channel)

        def generate(request):
            return list(stub.Generate(request, timeout=CALL_TIMEOUT_S))

        @FUZZ
        @given(request=generate_request(vocab, image_id, hidden))
        def property_(request):
            try:
                messages = generate(request)
            except grpc.RpcError as exc:
                event(exc.code().name)
                outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1
                assert exc.code() in ALLOWED, (exc.code(), exc.details())
                assert exc.details()
                return
            event("OK")
            outcomes["OK"] = outcomes.get("OK", 0) + 1
            check_generation(messages, request, vocab)

        try:
            property_()
            return [answers(generate(request)) for request in references]
        finally:
            channel.close()

    async def body(stub, channel, address):
        return await asyncio.to_thread(fuzz, address)

    after = with_server(engine, body)
    for (tokens, values), (want_tokens, want_values) in zip(after, expected, strict=True):
        assert len(tokens) == 8 and tokens == want_tokens
        assert values == pytest.approx(want_values, abs=1e-4)
    assert outcomes.get("OK", 0) >= 10 and outcomes.get("INVALID_ARGUMENT", 0) >= 10, outcomes
    assert engine.is_alive() and engine.num_running() == 0
    assert engine.num_free_blocks() == engine.block_manager.num_blocks  # nothing leaked


def count_outcome(outcomes: dict[str, int], name: str) -> None:
    """Tally one call's outcome (a status name, or OK), also for hypothesis' statistics."""
    event(name)
    outcomes[name] = outcomes.get(name, 0) + 1


def check_refusal(outcomes: dict[str, int], exc: grpc.RpcError, allowed: set[grpc.StatusCode]) -> None:
    """A refused call: an allowed status, with a message saying why."""
    count_outcome(outcomes, exc.code().name)
    assert exc.code() in allowed, (exc.code(), exc.details())
    assert exc.details()


# ---- the vision service ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    encoder = VisionEncoder(VisionConfig(checkpoint=str(tiny_checkpoint)))
    yield encoder
    encoder.close()


def test_fuzzed_embed_requests_never_fail_internally(encoder):
    allowed = ALLOWED | {grpc.StatusCode.NOT_FOUND}  # a hash-only image the cache does not hold
    reference = vision_pb2.EmbedRequest(request_id="reference", images=[vision_pb2.ImageInput(data=GOOD)])
    outcomes: dict[str, int] = {}

    def fuzz(address: str):
        channel = grpc.insecure_channel(address, options=channel_options(64 << 20))
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        before = stub.Embed(reference, timeout=CALL_TIMEOUT_S)

        @settings(FUZZ, max_examples=80)
        @given(request=embed_request())
        def property_(request):
            try:
                response = stub.Embed(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                check_refusal(outcomes, exc, allowed)
                return
            count_outcome(outcomes, "OK")
            assert len(response.embeddings) == len(request.images)
            for got, sent in zip(response.embeddings, request.images, strict=True):
                tensor = tensor_from_pb(got.embedding)
                assert tensor.ndim == 2 and tensor.shape[0] >= 1 and tensor.shape[1] == encoder.hidden_size
                assert torch.isfinite(tensor).all()
                if sent.data:
                    assert got.content_hash == content_hash(sent.data)

        try:
            property_()
            after = stub.Embed(reference, timeout=CALL_TIMEOUT_S)
        finally:
            channel.close()
        return before, after

    async def body(stub, address):
        return await asyncio.to_thread(fuzz, address)

    before, after = serve_vision(encoder, body)
    assert after.embeddings[0].content_hash == before.embeddings[0].content_hash == content_hash(GOOD)
    torch.testing.assert_close(
        tensor_from_pb(after.embeddings[0].embedding),
        tensor_from_pb(before.embeddings[0].embedding),
        rtol=0,
        atol=0,
    )
    assert outcomes.get("OK", 0) >= 5 and outcomes.get("INVALID_ARGUMENT", 0) >= 5, outcomes
