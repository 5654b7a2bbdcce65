"""Qwen2-VL adapters in-process: strict loading, tied embeddings, per-request pixels and the cache key,
grid checks at the LLM boundary."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_service.engine import Engine
from llm_service.models.qwen2_vl import Qwen2VLLanguageModel
from mmserve.errors import CheckpointError, InvalidInputError
from mmserve.images import content_hash
from mmserve.wire import GenerateRequest, ImageInput, ImageSpan, PixelLimits, SamplingParams
from tests.checkpoints.qwen2_vl import build_qwen2_vl_checkpoint
from tests.helpers import make_image
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder
from vision_service.models.qwen2_vl import Qwen2VLVision


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    return build_qwen2_vl_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl", "qwen2_vl", seed=3)


def _without(checkpoint, tmp_path, dropped_prefix: str):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(checkpoint, copy)
    state = load_file(copy / "model.safetensors")
    key = next(k for k in sorted(state) if k.startswith(dropped_prefix))
    del state[key]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    return copy, key


def test_a_missing_vision_key_is_a_startup_error(qwen_checkpoint, tmp_path):
    broken, key = _without(qwen_checkpoint, tmp_path, "visual.blocks.1.")
    with pytest.raises(CheckpointError, match="missing 1") as info:
        Qwen2VLVision.from_checkpoint(str(broken), torch.float32, "cpu")
    assert key.removeprefix("visual.") in str(info.value)


def test_a_missing_text_key_is_a_startup_error(qwen_checkpoint, tmp_path):
    broken, key = _without(qwen_checkpoint, tmp_path, "model.layers.1.")
    with pytest.raises(CheckpointError, match="missing 1"):
        Qwen2VLLanguageModel(str(broken), torch.float32, "cpu")


def test_tied_word_embeddings(tmp_path):
    checkpoint = build_qwen2_vl_checkpoint(tmp_path / "tied", "qwen2_5_vl", seed=1, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(checkpoint / "model.safetensors")
    model = Qwen2VLLanguageModel(str(checkpoint), torch.float32, "cpu")
    assert torch.equal(model.decoder.lm_head.weight, model.decoder.embed_tokens.weight)


def test_per_request_pixels_change_n_and_the_cache_key(qwen_checkpoint):
    encoder = VisionEncoder(VisionConfig(checkpoint=str(qwen_checkpoint), preprocess_workers=1))
    data = make_image(400, 300, seed=9)
    image = ImageInput(data, content_hash(data))

    async def run():
        default = (await encoder.embed_async([image]))[0]
        small = (await encoder.embed_async([image], pixels=PixelLimits(max_pixels=28 * 28 * 6)))[0]
        again = (
            await encoder.embed_async(
                [ImageInput(b"", image.content_hash)], pixels=PixelLimits(max_pixels=28 * 28 * 6)
            )
        )[0]
        with pytest.raises(InvalidInputError, match="larger than max_pixels"):
            await encoder.embed_async(
                [image], pixels=PixelLimits(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 6)
            )
        return default, small, again

    try:
        default, small, again = asyncio.run(run())
    finally:
        encoder.close()
    assert default.num_tokens > small.num_tokens
    for features in (default, small):
        t, h, w = features.grid_thw
        assert t * h * w // 4 == features.num_tokens
    assert again.grid_thw == small.grid_thw and torch.equal(again.embedding, small.embedding)
    assert encoder.metrics.images.labels("cached")._value.get() == 1


def test_server_wide_pixels(qwen_checkpoint):
    """The server's --max-pixels bounds every image; a request may narrow it, never widen it."""
    encoder = VisionEncoder(VisionConfig(checkpoint=str(qwen_checkpoint), max_pixels=28 * 28 * 16))
    data = make_image(400, 300, seed=9)
    image = [ImageInput(data, content_hash(data))]
    try:
        [features] = asyncio.run(encoder.embed_async(image))
        [smaller] = asyncio.run(encoder.embed_async(image, pixels=PixelLimits(max_pixels=28 * 28 * 4)))
        with pytest.raises(InvalidInputError, match="above this server's max_pixels"):
            asyncio.run(encoder.embed_async(image, pixels=PixelLimits(max_pixels=28 * 28 * 64)))
    finally:
        encoder.close()
    assert smaller.num_tokens < features.num_tokens <= 16


def test_fixed_resolution_families_reject_pixel_options(tiny_checkpoint):
    with pytest.raises(ValueError, match="dynamic-resolution"):
        VisionEncoder(VisionConfig(checkpoint=str(tiny_checkpoint), max_pixels=10000))
    encoder = VisionEncoder(VisionConfig(checkpoint=str(tiny_checkpoint)))
    data = make_image(40, 40, seed=1)
    try:
        with pytest.raises(InvalidInputError, match="not supported by the llava family"):
            asyncio.run(
                encoder.embed_async(
                    [ImageInput(data, content_hash(data))], pixels=PixelLimits(max_pixels=1000)
                )
            )
    finally:
        encoder.close()


def test_the_llm_checks_each_span_grid(qwen_checkpoint):
    model = Qwen2VLLanguageModel(str(qwen_checkpoint), torch.float32, "cpu")
    engine = Engine(model)
    try:
        ids = [1, 2] + [model.image_token_id] * 6 + [3]

        def request(grid):
            span = ImageSpan(
                offset=2, embedding=torch.zeros(6, model.hidden_size), content_hash="x", grid_thw=grid
            )
            return GenerateRequest("r", ids, [span], SamplingParams())

        engine.validate(request((1, 4, 6)))
        with pytest.raises(InvalidInputError, match="gives 4 tokens but the span has 6"):
            engine.validate(request((1, 4, 4)))
        with pytest.raises(InvalidInputError, match=r"\[t, h, w\] is required"):
            engine.validate(request(()))
    finally:
        engine.stop()


def test_mrope_through_chunked_prefill_and_the_prefix_cache(qwen_checkpoint):
    """M-RoPE positions survive a prompt split into chunks that cut through the image, and a second
    request that reuses the first one's KV (image included) from the prefix cache: the same tokens and
    logprobs as one engine step per prompt with no cache."""
    model = Qwen2VLLanguageModel(str(qwen_checkpoint), torch.float32, "cpu")
    embedding = torch.randn(6, model.hidden_size, generator=torch.Generator().manual_seed(4))
    text = [t for t in range(1, 40) if t != model.image_token_id]
    prefix = text[:3] + [model.image_token_id] * 6 + text[3:7]

    def request(name: str, tail: list[int]) -> GenerateRequest:
        span = ImageSpan(offset=3, embedding=embedding, content_hash="img", grid_thw=(1, 4, 6))
        params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=0)
        return GenerateRequest(name, prefix + tail, [span], params)

    async def generate(engine, req):
        tokens, logprobs = [], []
        async for out in engine.generate(req):
            tokens += out.token_ids
            logprobs += [lp.logprob for lp in out.logprobs or []]
        return tokens, logprobs, out.usage.cached_tokens

    def run(**config):
        engine = Engine(model, **config)
        try:  # one after the other, so that the second can find the first's blocks
            return [
                asyncio.run(generate(engine, request(n, t))) for n, t in (("a", [8, 9]), ("b", [10, 11, 12]))
            ]
        finally:
            engine.stop()

    plain = run(max_num_batched_tokens=4096, enable_prefix_caching=False)
    chunked = run(max_num_batched_tokens=5, block_size=4)
    assert chunked[1][2] == 12  # the second request found 3 full blocks: text, the image and text
    assert plain[1][2] == 0
    for (tokens, logprobs, _), (ref_tokens, ref_logprobs, _) in zip(chunked, plain, strict=True):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-5)
