"""The real, full-size Hub configs build the right vision-half shapes, and the references match the shipped indexes."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests import full_size_cases
from tests.full_size_cases import (
    BF16,
    CASES,
    CONFIGS,
    IDS,
    clip_layer_params,
    our_vision_from_config,
    raw_config,
    vision_output_width,
)
from tests.full_size_reference import count, numel, qwen_vl_shapes
from tests.memory_checkpoint import serve_from_memory

prepared = full_size_cases.prepared  # the shared module-scoped fixture
_offline = full_size_cases._offline  # autouse: no Hub access


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vision_half_from_config(case, prepared, monkeypatch):
    """The vision adapter's modules, as constructed from the config, have transformers' count."""
    serve_from_memory(monkeypatch, {})  # no network for the CLIP tower
    ckpt, ref = prepared(case)
    with torch.device("meta"):
        model = our_vision_from_config(case, ckpt)
    assert count(model) == ref.vision
    assert vision_output_width(model, case) == model.config.text_config.hidden_size == case.llm_hidden


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vision_adapter_builds_full_size(case, prepared, monkeypatch):
    """from_checkpoint with the weight reads answered in memory: strict load, then the unused CLIP layers
    dropped (exactly those after the selected hidden state), and fixed-resolution token counts."""
    from mmserve.families import adapter

    ckpt, ref = prepared(case)
    serve_from_memory(monkeypatch, ref.on_disk)
    with torch.device("meta"):
        full = our_vision_from_config(case, ckpt)
        model = adapter(case.family, "vision").from_checkpoint(str(ckpt), torch.bfloat16, "meta")
    if case.family in ("llava", "llava_next", "llava_original"):
        layers, per_layer = clip_layer_params(full.vision_tower)
        kept, _ = clip_layer_params(model.vision_tower)
        assert kept == max(model.feature_states) == layers - 1  # vision_feature_layer -2
        assert count(model) == ref.vision - (layers - kept) * per_layer
    else:
        assert count(model) == ref.vision
    assert model.config.text_config.hidden_size == case.llm_hidden
    if case.tokens_per_image is not None:
        side = raw_config(case)["visual"]["image_size"] if case.family == "qwen_vl" else 336
        (rows,) = model(torch.empty(1, 3, side, side, device="meta"))
        assert tuple(rows.shape) == (case.tokens_per_image, case.llm_hidden)


def test_qwen_vl_shapes_match_its_checkpoint_index():
    """The remote-code shapes used as Qwen-VL's reference name every tensor of the real index, and add up
    to its total_size (bf16): 22016 // 2 = 11008 is the MLP width."""
    case = CASES[IDS.index("qwen_vl_chat")]
    index = json.loads((CONFIGS / case.folder / "pytorch_model.bin.index.json").read_text())
    shapes = qwen_vl_shapes(raw_config(case))
    assert set(shapes) == set(index["weight_map"])
    assert sum(numel(s) for s in shapes.values()) * BF16 == index["metadata"]["total_size"]
    assert shapes["transformer.h.0.mlp.w1.weight"] == (11008, 4096)


def test_llava_hf_reference_matches_its_checkpoint_index(prepared):
    """transformers' llava-1.5-7b-hf on meta names the real index's tensors and adds up to its total_size."""
    case = CASES[IDS.index("llava_1_5_hf")]
    ckpt, ref = prepared(case)
    index = json.loads((CONFIGS / case.folder / "model.safetensors.index.json").read_text())
    assert set(ref.on_disk[str(ckpt)]) == set(index["weight_map"])
    assert (ref.language + ref.vision) * BF16 == index["metadata"]["total_size"]


def test_original_llava_reference_matches_its_checkpoint_index(prepared):
    """liuhaotian/llava-v1.5-7b's index: LLaMA + mm_projector (no CLIP tower), plus 32 saved fp32
    rotary inv_freq buffers of head_dim / 2 = 64 values each."""
    case = CASES[IDS.index("llava_v1_5_original")]
    ckpt, ref = prepared(case)
    index = json.loads((CONFIGS / case.folder / "pytorch_model.bin.index.json").read_text())
    inv_freq = {k for k in index["weight_map"] if k.endswith(".rotary_emb.inv_freq")}
    assert len(inv_freq) == 32
    disk = ref.on_disk[str(ckpt)]
    assert set(disk) == set(index["weight_map"]) - inv_freq
    projector = sum(t.numel() for k, t in disk.items() if k.startswith("model.mm_projector."))
    assert (ref.language + projector) * BF16 + 32 * 64 * 4 == index["metadata"]["total_size"]
    assert not re.search(r"vision_tower", " ".join(index["weight_map"]))
