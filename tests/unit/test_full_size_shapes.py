"""The real, full-size Hub configs (shared/reference/configs) build the right model shapes, without weights.

For every real config file, copied as `config.json` into a tmp folder, both halves are built on the meta
device through OUR config-reading code, and their parameter counts are compared with transformers' own
model built from the same file (or, for Qwen-VL v1, which transformers lacks, with the remote code's
tensor shapes: Qwen/Qwen-VL-Chat's modeling_qwen.py and visual.py). Checkpoint index files shipped with three of the configs
(`total_size` in bytes) cross-check the totals independently.

Two routes per half:
* config only: the functions the adapters call (AutoConfig / OriginalLlavaConfig / qwen2_config ->
  DecoderConfig.from_hf -> DecoderLM; the vision adapters' constructors);
* the adapters' real `__init__` / `from_checkpoint`, with the weight reads answered from an in-memory
  "checkpoint" of meta tensors laid out under the real on-disk key names (so key renames, tying, strict
  loading with its shape checks, and the unused-CLIP-layer drop all run as in production).

Tied embeddings are counted once on both sides (transformers shares one tensor; our DecoderLM holds
lm_head as its own parameter, filled from embed_tokens when the config ties).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints.hub_specs import REFERENCE_DIR
from tests.full_size_reference import (
    CLIP_TOWER,
    CLIP_VISION,
    Reference,
    count,
    numel,
    qwen_vl_shapes,
    reference,
)
from tests.memory_checkpoint import serve_from_memory

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


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_family_and_config_facts(case, prepared):
    """What our code derives from the file: family, image token, M-RoPE, the LM width the vision half serves."""
    from mmserve.families import detect_family

    ckpt, _ = prepared(case)
    assert detect_family(ckpt) == case.family
    raw = raw_config(case)
    text, tied = our_text_config(case, ckpt)
    assert tied is case.tied
    with torch.device("meta"):
        from llm_service.models.decoder import DecoderConfig

        dc = DecoderConfig.from_hf(text)
    assert dc.hidden_size == case.llm_hidden
    # M-RoPE is recognised by the presence of mrope_section, whatever rope_scaling's "type" says
    assert (dc.mrope_section is not None) is case.mrope
    if case.mrope:
        assert dc.mrope_section == (16, 24, 24)
        assert sum(dc.mrope_section) == dc.head_dim // 2
    if case.family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ckpt)
        assert raw["vision_token_id"] == 151654 and config.image_token_id == case.image_token_id != 151654
        if case.family == "qwen2_5_vl":  # hidden_size is the ViT width; out_hidden_size the LLM's
            assert config.vision_config.hidden_size == 1280
            assert config.vision_config.out_hidden_size == case.llm_hidden
        else:  # Qwen2-VL's vision hidden_size is the LLM's; embed_dim the ViT width
            assert config.vision_config.hidden_size == case.llm_hidden
            assert config.vision_config.embed_dim == 1280


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_language_half_from_config(case, prepared):
    """DecoderLM(DecoderConfig.from_hf(text_config)) has transformers' parameter count."""
    from llm_service.models.decoder import DecoderConfig, DecoderLM

    ckpt, ref = prepared(case)
    text, tied = our_text_config(case, ckpt)
    assert tied is ref.tied is case.tied
    with torch.device("meta"):
        dc = DecoderConfig.from_hf(text)
        decoder = DecoderLM(dc)
    assert decoder.lm_head.weight.shape == decoder.embed_tokens.weight.shape
    ours = count(decoder) - (decoder.lm_head.weight.numel() if tied else 0)
    assert ours == ref.language
    if case.family != "qwen_vl":  # Qwen-VL's served length is capped by its adapter (seq_length)
        assert dc.max_position_embeddings == case.max_model_len


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_language_adapter_builds_full_size(case, prepared, monkeypatch):
    """The family's real language adapter, fed a weightless checkpoint in the Hub's key layout: strict
    load (keys and shapes) passes, tying follows the config, and the facts the engine reads are right."""
    from llm_service.models.base import LanguageModel
    from mmserve.families import adapter

    ckpt, ref = prepared(case)
    serve_from_memory(monkeypatch, ref.on_disk)
    seen = {}
    original = LanguageModel._load

    def spy(self, config, state, what, device, dtype, **kwargs):
        seen.update(kwargs, has_lm_head="lm_head.weight" in state)
        return original(self, config, state, what, device, dtype, **kwargs)

    monkeypatch.setattr(LanguageModel, "_load", spy)
    with torch.device("meta"):
        lm = adapter(case.family, "language")(str(ckpt), torch.bfloat16, "meta")
    assert bool(seen.get("tie_word_embeddings", False)) is case.tied
    assert seen["has_lm_head"] is not case.tied  # tied checkpoints ship no lm_head tensor
    # a loaded tied decoder holds one Parameter for both (counted once, as transformers' is)
    assert (lm.decoder.lm_head.weight is lm.decoder.embed_tokens.weight) is case.tied
    assert count(lm.decoder) == ref.language
    assert lm.hidden_size == case.llm_hidden
    assert lm.max_model_len == case.max_model_len
    assert lm.image_token_id == case.image_token_id
    assert (lm.position_dims == 3) is case.mrope


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
