"""mmserve.half_cpu on checkpoints built from the real Hub configs, in their own bf16: the vision
towers' patch embeddings (Qwen2.5-VL's Conv3d, LLaVA's CLIP Conv2d) and Linears, and the language
model's Linears, compute large calls in float32, and what comes out matches the native bf16 path up
to bf16 rounding. Forced on with MMSERVE_CPU_UPCAST_ROWS so that it holds on CPUs with native bf16 too."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llm_service.config import LLMConfig
from llm_service.models import load_language_model
from mmserve.half_cpu import ENV, UpcastConv2d, UpcastConv3d, UpcastLinear
from tests.checkpoints.hub import build_from_hub
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder


def embed(checkpoint, image: Image.Image) -> tuple[torch.Tensor, VisionEncoder]:
    encoder = VisionEncoder(VisionConfig(checkpoint=str(checkpoint), dtype="bfloat16"))
    try:
        item = encoder.adapter.preprocess_one(encoder.adapter.load_processor(str(checkpoint)), image)
        inputs = {name: torch.from_numpy(array) for name, array in item.items()}
        (out,) = encoder.run_batch([inputs])
        return out, encoder
    finally:
        encoder.close()


@pytest.mark.parametrize(("name", "conv"), [("qwen2_5_vl_7b", UpcastConv3d), ("llava_1_5_hf", UpcastConv2d)])
def test_vision_tower_in_bf16_computes_in_float32_and_matches_native(monkeypatch, tmp_path, name, conv):
    checkpoint = build_from_hub(name, tmp_path / name, dtype="bfloat16")
    image = Image.effect_noise((224, 224), 64).convert("RGB")
    monkeypatch.setenv(ENV, "0")
    native, plain = embed(checkpoint, image)
    monkeypatch.setenv(ENV, "8")
    upcast, swapped = embed(checkpoint, image)
    kinds = {type(m) for m in swapped.model.modules()}
    assert conv in kinds and UpcastLinear in kinds
    assert not kinds & {UpcastConv2d, UpcastConv3d, UpcastLinear} - {conv, UpcastLinear}
    assert UpcastLinear not in {type(m) for m in plain.model.modules()}
    assert upcast.dtype == native.dtype == torch.bfloat16 and upcast.shape == native.shape
    scale = native.float().abs().max().item()
    torch.testing.assert_close(upcast.float(), native.float(), atol=0.05 * scale, rtol=0.05)


def test_language_model_linears_in_bf16_compute_in_float32(monkeypatch, tmp_path):
    checkpoint = build_from_hub("qwen2_vl_2b", tmp_path / "q2b", dtype="bfloat16")
    monkeypatch.setenv(ENV, "8")
    model = load_language_model(LLMConfig(checkpoint=str(checkpoint), dtype="auto"))
    decoder = model.decoder
    assert model.dtype == torch.bfloat16 and type(decoder.lm_head) is UpcastLinear
    assert all(type(layer.mlp.gate_up_proj) is UpcastLinear for layer in decoder.layers)
    assert all(p.dtype == torch.bfloat16 for p in decoder.parameters())  # memory as the checkpoint
    assert decoder.lm_head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()  # still tied
    hidden = torch.randn(16, decoder.lm_head.in_features).to(torch.bfloat16)
    expected = torch.nn.functional.linear(hidden.float(), decoder.lm_head.weight.float())
    torch.testing.assert_close(decoder.lm_head(hidden), expected.to(torch.bfloat16), atol=0, rtol=0)
