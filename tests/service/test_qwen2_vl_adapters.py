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
