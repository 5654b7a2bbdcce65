"""Requests with the same image arriving together, on the real engine and model (float32): the image's
KV is prefilled once (the others wait for that prefill and take its blocks from the prefix cache), and
every answer is token for token what the same request gets from an engine without a prefix cache."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

BLOCK = 4
IMAGE_ROWS = 12


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))


def requests(model, image: torch.Tensor, questions: list[list[int]]) -> list[GenerateRequest]:
    prompt_start = [1, 40, 41]
    ids_of = [prompt_start + [model.image_token_id] * IMAGE_ROWS + q for q in questions]
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    return [
        GenerateRequest(f"r{i}", ids, [ImageSpan(len(prompt_start), image, "same")], params)
        for i, ids in enumerate(ids_of)
    ]


async def run_together(engine: Engine, batch: list[GenerateRequest]) -> list[tuple[list[int], int]]:
    async def one(request):
        tokens, cached = [], 0
        async for out in engine.generate(request):
            tokens += out.token_ids
            if out.usage is not None:
                cached = out.usage.cached_tokens
        return tokens, cached

    return await asyncio.gather(*(one(r) for r in batch))


def test_the_same_image_sent_together_is_prefilled_once_and_answers_are_unchanged(model):
    image = torch.randn(IMAGE_ROWS, model.hidden_size, generator=torch.Generator().manual_seed(3))
    batch = requests(model, image.to(model.dtype), [[50 + i, 60, 70 + i] for i in range(4)])
    prefix_blocks = (3 + IMAGE_ROWS) // BLOCK * BLOCK  # the full blocks before the questions differ

    sharing = Engine(model, block_size=BLOCK, kv_cache_bytes=16 << 20)
    plain = Engine(model, block_size=BLOCK, kv_cache_bytes=16 << 20, enable_prefix_caching=False)
    try:
        shared = asyncio.run(run_together(sharing, batch))
        alone = asyncio.run(run_together(plain, batch))
        hits = sharing.block_manager.prefix_hits
    finally:
        sharing.stop()
        plain.stop()

    assert [tokens for tokens, _ in shared] == [tokens for tokens, _ in alone]
    assert all(len(tokens) == 6 for tokens, _ in shared)
    cached = sorted(c for _, c in shared)
    assert cached == [0] + [prefix_blocks] * 3, cached  # one prefill of the image, three cache hits
    assert hits == 3 * prefix_blocks
