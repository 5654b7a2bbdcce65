"""Decode staging (contiguous per-sequence KV rows for the sdpa backend) computes what gathering the
paged blocks computes: same tokens, same logprobs, with rows joining, leaving, being refilled after
preemption, and the staging budget running out mid-run."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llm_service.config import LLMConfig
from llm_service.engine import Engine, EngineConfig
from llm_service.models import load_language_model
from mmserve.wire import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))


def requests(vocab: int, image_id: int) -> list[GenerateRequest]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(12):
        ids = [
            t for t in torch.randint(3, vocab, (5 + 9 * i,), generator=generator).tolist() if t != image_id
        ]
        params = SamplingParams(temperature=0, max_new_tokens=6 + 3 * (i % 4), ignore_eos=True, logprobs=0)
        out.append(GenerateRequest(f"r{i}", ids, [], params))
    return out


def run(model, **config):
    async def one(engine, request):
        tokens, logprobs = [], []
        async for out in engine.generate(request):
            tokens += out.token_ids
            logprobs += [lp.logprob for lp in out.logprobs or []]
        return tokens, logprobs

    async def all_at_once(engine):
        return await asyncio.gather(
            *(one(engine, r) for r in requests(model.vocab_size, model.image_token_id))
        )

    # Small blocks and cache, a small step budget: prefills are chunked, sequences preempted and
    # refilled, and rows come and go while others decode.
    engine = Engine(
        model, EngineConfig(block_size=4, kv_cache_bytes=120 * 1024, max_num_batched_tokens=24, **config)
    )
    try:
        results = asyncio.run(all_at_once(engine))
        return results, engine
    finally:
        engine.stop()


@pytest.mark.parametrize("staging_bytes", [512 << 20, 48 * 1024], ids=["staged", "budget-runs-out"])
def test_staging_equals_gathering_blocks(model, staging_bytes):
    gathered, _ = run(model, decode_staging_bytes=0)
    staged, engine = run(model, decode_staging_bytes=staging_bytes)
    assert engine.scheduler.num_preemptions > 0
    staging = engine.runner.attend.staging
    assert staging is not None
    assert staging.max_bytes == staging_bytes and staging.peak_rows > 1
    if staging_bytes > 1 << 20:
        assert staging.fallbacks == 0
    else:
        assert staging.fallbacks > 0  # the budget ran out mid-run and decodes gathered blocks instead
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(staged, gathered, strict=True):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-5)


def test_staging_rows_start_as_zeros_never_garbage():
    """Masked columns still go through probs @ values: 0 x NaN is NaN, so fresh rows must be zeros."""
    from llm_service.attention import LayerCache
    from llm_service.attention.sdpa_staging import DecodeStaging

    for _ in range(3):  # a freed allocation of the same size is the likeliest to come back dirty
        garbage = torch.full((2, 3, 32, 8), float("nan"))
        del garbage
        layers = [LayerCache(torch.zeros(2, 10, 4, 8), torch.zeros(2, 10, 4, 8))]
        staging = DecodeStaging(layers, block_size=4, max_bytes=1 << 20)
        assert staging._reserve(3, 32)
        assert layers[0].stage_k is not None and layers[0].stage_v is not None
        assert torch.equal(layers[0].stage_v, torch.zeros_like(layers[0].stage_v))
        assert torch.equal(layers[0].stage_k, torch.zeros_like(layers[0].stage_k))


def test_half_model_stages_float32_rows_where_decode_attention_upcasts(tiny_checkpoint, monkeypatch):
    """bf16 weights and KV cache on a CPU without native bf16 matmul (forced with the env, so this runs
    on any CPU): the staging rows are float32 copies, and decoding over them gives the tokens of the
    gathered path, which casts the same bf16 keys to float32 at each step. With the upcast off the rows
    stay bf16."""
    half = load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint), dtype="bfloat16"))
    monkeypatch.setenv("MMSERVE_CPU_UPCAST_ROWS", "8")
    gathered, _ = run(half, decode_staging_bytes=0)
    staged, engine = run(half, decode_staging_bytes=512 << 20)
    staging = engine.runner.attend.staging
    assert staging is not None and staging.dtype == torch.float32 and staging.fallbacks == 0
    assert engine.runner.kv_caches[0].k.dtype == torch.bfloat16  # the cache itself stays as loaded
    assert engine.runner.kv_caches[0].stage_k.dtype == torch.float32
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(staged, gathered, strict=True):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4)

    monkeypatch.setenv("MMSERVE_CPU_UPCAST_ROWS", "0")
    _, native = run(half, decode_staging_bytes=512 << 20)
    assert native.runner.attend.staging.dtype == torch.bfloat16
    assert native.runner.kv_caches[0].stage_k.dtype == torch.bfloat16
