"""Shared cases and builders for the full-size Hub config shape tests (tests/unit/test_full_size_*.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints.hub_specs import REFERENCE_DIR
from tests.full_size_reference import CLIP_TOWER, CLIP_VISION, Reference, count, reference

CONFIGS = REFERENCE_DIR
BF16 = 2  # bytes per element of the shipped (bf16 / fp16) weights


@dataclass(frozen=True)
class Case:
    name: str
    folder: str
    file: str
    family: str
    tied: bool
    max_model_len: int
    image_token_id: int
    mrope: bool
    llm_hidden: int
    tokens_per_image: int | None = None  # fixed-resolution families only


# fmt: off
def _case(name, folder, file, family, *, tied, max_len, image_token, mrope, hidden, tokens=None) -> Case:
    return Case(name, folder, file, family, tied, max_len, image_token, mrope, hidden, tokens)


QWEN2_2B_PARTIAL = "config.TangLinJie-Qwen2-VL-bm.partial.json"
QWEN2_7B_PARTIAL = "config.sophgo-LLM-TPU-modified.partial.json"
LLAVA_NEXT_PARTIAL = "config.TensorRT-LLM-test-fixture.partial.json"
QWEN2 = dict(image_token=151655, mrope=True)
LLAMA = dict(mrope=False, hidden=4096)
CASES = [
    # Qwen-VL v1: served context capped at seq_length (2048); image rows replace <imgpad> (151859)
    _case("qwen_vl_chat", "Qwen__Qwen-VL-Chat", "config.json", "qwen_vl",
          tied=False, max_len=2048, image_token=151859, tokens=256, **LLAMA),
    # re-saved by transformers 4.45: sparse vision_config, rope_scaling with mrope_section first;
    # its quantization_config is ignored here (unquantized shapes)
    _case("qwen2_vl_2b_awq", "Qwen__Qwen2-VL-2B-Instruct-AWQ", "config.json", "qwen2_vl",
          tied=True, max_len=32768, hidden=1536, **QWEN2),
    _case("qwen2_vl_2b", "Qwen__Qwen2-VL-2B-Instruct", QWEN2_2B_PARTIAL, "qwen2_vl",
          tied=True, max_len=32768, hidden=1536, **QWEN2),
    # sophgo's copy says max_position_embeddings 2048 (the Hub's is 32768): the file is what is served
    _case("qwen2_vl_7b", "Qwen__Qwen2-VL-7B-Instruct", QWEN2_7B_PARTIAL, "qwen2_vl",
          tied=False, max_len=2048, hidden=3584, **QWEN2),
    _case("qwen2_5_vl_3b", "Qwen__Qwen2.5-VL-3B-Instruct", "config.json", "qwen2_5_vl",
          tied=True, max_len=128000, hidden=2048, **QWEN2),
    _case("qwen2_5_vl_7b", "Qwen__Qwen2.5-VL-7B-Instruct", "config.json", "qwen2_5_vl",
          tied=False, max_len=128000, hidden=3584, **QWEN2),
    # original LLaVA: no image-token field; the placeholder comes from the tokenizer (<unk> = 0 for LLaMA's)
    _case("llava_v1_5_original", "liuhaotian__llava-v1.5-7b", "config.json", "llava_original",
          tied=False, max_len=4096, image_token=0, tokens=576, **LLAMA),
    _case("llava_1_5_hf", "llava-hf__llava-1.5-7b-hf", "config.json", "llava",
          tied=False, max_len=4096, image_token=32000, tokens=576, **LLAMA),
    # TensorRT-LLM fixture: vision_config.num_hidden_layers is 2 there (24 on the Hub); sliding_window null
    _case("llava_v1_6_mistral", "llava-hf__llava-v1.6-mistral-7b-hf", LLAVA_NEXT_PARTIAL, "llava_next",
          tied=False, max_len=32768, image_token=32000, **LLAMA),
]
# fmt: on
IDS = [c.name for c in CASES]


def raw_config(case: Case) -> dict:
    return json.loads((CONFIGS / case.folder / case.file).read_text())


def make_checkpoint(case: Case, root: Path) -> Path:
    """A folder holding the real config as config.json (plus the real generation_config.json), no weights."""
    ckpt = root / case.name
    ckpt.mkdir()
    shutil.copyfile(CONFIGS / case.folder / case.file, ckpt / "config.json")
    gen = CONFIGS / case.folder / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, ckpt / "generation_config.json")
    if case.family == "llava_original":  # mm_vision_tower, resolved as <checkpoint>/<name>/config.json first
        from transformers import CLIPConfig

        tower = ckpt / CLIP_TOWER
        tower.mkdir(parents=True)
        CLIPConfig(vision_config=CLIP_VISION).to_json_file(str(tower / "config.json"))
    return ckpt


# ---------------------------------------------------------------------------------------------------
# Our model halves
# ---------------------------------------------------------------------------------------------------


def our_text_config(case: Case, ckpt: Path):
    """(text config, top-level tie flag) exactly as the family's language adapter reads them."""
    from transformers import AutoConfig

    if case.family == "qwen_vl":
        from llm_service.models.qwen_vl import qwen2_config

        raw = json.loads((ckpt / "config.json").read_text())
        return qwen2_config(raw), bool(raw.get("tie_word_embeddings", False))
    if case.family == "llava_original":
        from mmserve.llava_original import OriginalLlavaConfig

        mm = OriginalLlavaConfig.from_checkpoint(ckpt)
        return mm.text_config(), bool(mm.raw.get("tie_word_embeddings", False))
    config = AutoConfig.from_pretrained(ckpt)
    # transformers ties by the top-level flag; no real config has one inside text_config
    return config.get_text_config(), bool(getattr(config, "tie_word_embeddings", False))


def our_vision_from_config(case: Case, ckpt: Path) -> torch.nn.Module:
    """The vision adapter's constructor on the config, before any weights (and before the CLIP drop)."""
    from transformers import AutoConfig

    from mmserve.families import adapter

    cls = adapter(case.family, "vision")
    if case.family == "qwen_vl":
        return cls(raw_config(case)["visual"])
    if case.family == "llava_original":
        from mmserve.llava_original import OriginalLlavaConfig

        mm = OriginalLlavaConfig.from_checkpoint(ckpt)
        clip_config = AutoConfig.from_pretrained(mm.vision_tower)
        clip_config = getattr(clip_config, "vision_config", clip_config)
        return cls(mm, clip_config, int(mm.text_config().hidden_size))
    return cls(AutoConfig.from_pretrained(ckpt))


def vision_output_width(model: Any, case: Case) -> int:
    """Width of one embedding row the vision half produces (its last projection's output)."""
    if case.family == "qwen_vl":
        return int(model.vision_tower.proj.shape[1])
    if case.family in ("qwen2_vl", "qwen2_5_vl"):
        head = model.vision_tower.merger
    else:
        head = getattr(model, "multi_modal_projector", None) or model.mm_projector
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def clip_layer_params(tower: Any) -> tuple[int, int]:
    layers = getattr(tower, "vision_model", tower).encoder.layers
    return len(layers), count(layers[0])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """case -> (its checkpoint folder, transformers' reference), built once per case for the module."""
    cache: dict[str, tuple[Path, Reference]] = {}

    def get(case: Case) -> tuple[Path, Reference]:
        if case.name not in cache:
            ckpt = make_checkpoint(case, tmp_path_factory.mktemp("ckpt"))
            cache[case.name] = (ckpt, reference(raw_config(case), case.family, ckpt))
        return cache[case.name]

    return get


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
