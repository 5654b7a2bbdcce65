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

import pytest
import torch

from tests import full_size_cases
from tests.full_size_cases import CASES, IDS, our_text_config, raw_config
from tests.full_size_reference import count
from tests.memory_checkpoint import serve_from_memory

prepared = full_size_cases.prepared  # the shared module-scoped fixture
_offline = full_size_cases._offline  # autouse: no Hub access


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
