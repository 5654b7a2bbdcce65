"""Tiny random-weight checkpoints built from the *real* Hub files (shared/reference/configs).

Our other builders (tests/checkpoints/*.py, tools/checkpoints.py) write checkpoints in the shape our own code
expects; they hid real bugs (e.g. the Qwen2-VL Hub config.json is flat: no `text_config`). Here each
checkpoint starts from a reference folder: config.json is the real JSON with only the size values
replaced (key order, nesting, sparseness, token ids, `vocab_size`, `torch_dtype`, `rope_scaling` shape,
`tie_word_embeddings` ... all kept), the tokenizer / processor / generation / chat-template files are
copied byte for byte where the reference has them, and the weights are random (seeded) under exactly
the key names the real repo uses, in its format (sharded safetensors or `.bin` + index).

    from tests.checkpoints.hub import HUB_CONFIGS, build_from_hub
    path = build_from_hub("qwen2_5_vl_7b", tmp_path / "q")           # dtype: the config's torch_dtype
    path = build_from_hub("llava_1_5_hf", tmp_path / "l", dtype="float32")

Every addition or removal beyond shrinking sizes is listed in the spec (`added`, `removed`, `notes`), so
tests/unit/test_hub_builders.py can check the built config against the real one key by key.

The reference tree is tests/hub_configs/ (a copy of the team's shared/reference/configs).
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]

# Qwen2-VL / Qwen2.5-VL preprocessors: 4..16 merged tokens per image (28 px = one merged token side).
QWEN_MIN_PIXELS = 28 * 28 * 4
QWEN_MAX_PIXELS = 28 * 28 * 16
LLAVA_IMAGE_SIZE = 56  # patch 14 -> a 4x4 grid: 16 image tokens (real: 336 -> 576)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# The real Hub files, copied byte for byte into the repository (tests/hub_configs/SOURCES.md says where
# each came from), so that every machine running the tests has them.
REFERENCE_DIR = _REPO / "tests" / "hub_configs"


def reference_dir() -> Path:
    """The reference configs folder (one sub-folder per Hub repo)."""
    return REFERENCE_DIR


@dataclass(frozen=True)
class HubSpec:
    """How one tiny checkpoint is derived from one reference folder.

    Paths in `sizes` / `added` / `removed` are dotted paths into config.json ("vision_config.depth").
    """

    name: str
    family: str  # qwen2_vl | qwen2_5_vl | llava | llava_next | llava_original | qwen_vl
    source: str  # the reference folder (Hub repo as Org__Repo)
    config: str  # the reference config file used, relative to the reference tree
    sizes: Mapping[str, Any]  # existing keys whose (size) values are replaced
    added: Mapping[str, Any] = field(default_factory=dict)  # keys the real file lacks (documented)
    removed: tuple[str, ...] = ()  # keys of the real file dropped (documented)
    files: Mapping[str, str] = field(default_factory=dict)  # out name -> reference file, copied byte for byte
    preprocessor: str | None = None  # reference preprocessor_config, written with `preprocessor_sizes`
    preprocessor_sizes: Mapping[str, Any] = field(default_factory=dict)
    index: str | None = None  # the real weight index (reference file) the key names must match
    weight_format: str = "safetensors"  # or "bin" (pytorch_model-0000N-of-0000M.bin + index)
    special_tokens: Mapping[str, int] = field(default_factory=dict)  # token -> real id, for the tests
    hf_class: str | None = None  # transformers class that must load it (native families)
    notes: str = ""


# --------------------------------------------------------------------------------------------------
# The specs
# --------------------------------------------------------------------------------------------------

_Q2 = "Qwen__Qwen2-VL-2B-Instruct"
_QAWQ = "Qwen__Qwen2-VL-2B-Instruct-AWQ"

# Text sizes of every Qwen2(.5)-VL entry: hidden 64, 4 heads -> head_dim 16, so mrope_section sums to 8
# ([16, 24, 24] for head_dim 128 scaled by 1/8).
_QWEN_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling.mrope_section": [2, 3, 3],
}
# Qwen2-VL vision: embed_dim is the ViT width, vision_config.hidden_size the LLM hidden size (merger output).
_QWEN2_VISION = {
    "vision_config.depth": 2,
    "vision_config.embed_dim": 32,
    "vision_config.num_heads": 2,
    "vision_config.hidden_size": 64,
}
# Qwen2.5-VL vision: hidden_size is the ViT width, out_hidden_size the LLM hidden size. The real
# fullatt_block_indexes [7, 15, 23, 31] make every 8th block (and the last) full attention; in depth 2:
# block 0 windowed, block 1 (the last) full.
_QWEN25_VISION = {
    "vision_config.depth": 2,
    "vision_config.hidden_size": 32,
    "vision_config.intermediate_size": 64,
    "vision_config.num_heads": 2,
    "vision_config.out_hidden_size": 64,
    "vision_config.fullatt_block_indexes": [1],
}
_QWEN_PREPROCESSOR = {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": QWEN_MAX_PIXELS}
_QWEN_SPECIAL = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}

# CLIP ViT-L/14-336 shrunk: width 32 (4x MLP as the real 1024/4096), 2 heads, 2 layers, 56 px.
_CLIP_VISION = {
    "vision_config.hidden_size": 32,
    "vision_config.intermediate_size": 128,
    "vision_config.num_attention_heads": 2,
    "vision_config.num_hidden_layers": 2,
    "vision_config.image_size": LLAVA_IMAGE_SIZE,
    "vision_config.projection_dim": 32,
}
# llava-hf text_config / vision_config are sparse: hidden_size, layers and heads come from the
# LlamaConfig / MistralConfig defaults (4096 / 32 / 32). A tiny model needs them written down, so these
# size keys are ADDED to text_config (the one deliberate change of shape besides shrinking).
_LLAMA_TEXT_ADDED = {
    "text_config.hidden_size": 64,
    "text_config.intermediate_size": 128,
    "text_config.num_hidden_layers": 2,
    "text_config.num_attention_heads": 4,  # num_key_value_heads stays absent: MHA, as Llama-2-7B
}
_LLAVA_SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}


def _scaled_pinpoints(side: int) -> list[list[int]]:
    """llava-hf's image_grid_pinpoints ([[336, 672], ...], multiples of the 336 px tile) for `side` px tiles."""
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]


HUB_CONFIGS: dict[str, HubSpec] = {
    spec.name: spec
    for spec in [
        HubSpec(
            name="qwen2_5_vl_7b",
            family="qwen2_5_vl",
            source="Qwen__Qwen2.5-VL-7B-Instruct",
            config="Qwen__Qwen2.5-VL-7B-Instruct/config.json",
            sizes={**_QWEN_TEXT, "max_window_layers": 2, **_QWEN25_VISION},
            files={
                "tokenizer_config.json": "Qwen__Qwen2.5-VL-7B-Instruct/tokenizer_config.json",
                "chat_template.json": "Qwen__Qwen2.5-VL-7B-Instruct/chat_template.json",
                "generation_config.json": "Qwen__Qwen2.5-VL-7B-Instruct/generation_config.json",
            },
            preprocessor="Qwen__Qwen2.5-VL-7B-Instruct/preprocessor_config.json",
            preprocessor_sizes=_QWEN_PREPROCESSOR,
            special_tokens=_QWEN_SPECIAL,
            hf_class="Qwen2_5_VLForConditionalGeneration",
            notes="Flat Hub config (no text_config), untied (lm_head.weight present), vocab_size 152064. "
            "All five files are hash-verified Hub blobs.",
        ),
        HubSpec(
            name="qwen2_5_vl_3b",
            family="qwen2_5_vl",
            source="Qwen__Qwen2.5-VL-3B-Instruct",
            config="Qwen__Qwen2.5-VL-3B-Instruct/config.json",
            # max_window_layers 70 > num_hidden_layers 36 in the real file: kept larger (70*2/36 -> 4).
            sizes={**_QWEN_TEXT, "max_window_layers": 4, **_QWEN25_VISION},
            files={
                "tokenizer_config.json": "Qwen__Qwen2.5-VL-3B-Instruct/tokenizer_config.json",
                "chat_template.json": "Qwen__Qwen2.5-VL-3B-Instruct/chat_template.json",
                # The true 3B generation_config.json was not found; sophgo's copy (sha differs from
                # the Hub blob) has the Instruct eos list [151645, 151643].
                "generation_config.json": "Qwen__Qwen2.5-VL-3B-Instruct/generation_config.sophgo-LLM-TPU.partial.json",
            },
            preprocessor="Qwen__Qwen2.5-VL-3B-Instruct/preprocessor_config.json",
            preprocessor_sizes=_QWEN_PREPROCESSOR,
            special_tokens=_QWEN_SPECIAL,
            hf_class="Qwen2_5_VLForConditionalGeneration",
            notes="Tied (no lm_head.weight), vocab_size 151936, max_window_layers > num_hidden_layers as in "
            "the real file. generation_config.json is sophgo's PARTIAL copy (the Hub blob was not found).",
        ),
        HubSpec(
            name="qwen2_vl_7b",
            family="qwen2_vl",
            source="Qwen__Qwen2-VL-7B-Instruct",
            config="Qwen__Qwen2-VL-7B-Instruct/config.sophgo-LLM-TPU-modified.partial.json",
            sizes={**_QWEN_TEXT, "max_window_layers": 2, **_QWEN2_VISION},
            files={
                "tokenizer_config.json": f"{_Q2}/tokenizer_config.sophgo-LLM-TPU.partial.json",
                "chat_template.json": f"{_Q2}/chat_template.json",
            },
            preprocessor=f"{_Q2}/preprocessor_config.sophgo-LLM-TPU.partial.json",
            preprocessor_sizes=_QWEN_PREPROCESSOR,
            special_tokens=_QWEN_SPECIAL,
            hf_class="Qwen2VLForConditionalGeneration",
            notes="sophgo's PARTIAL 7B config: flat Hub layout but max_position_embeddings 2048 (Hub: 32768), "
            "kept as found. Untied, vocab_size 152064. Only config.json exists for 7B in the reference, so the "
            "2B folder's tokenizer_config / chat_template / preprocessor are used (the sizes in SOURCES [L3] "
            "suggest they are the same files). No generation_config.json (none found for 7B).",
        ),
        HubSpec(
            name="qwen2_vl_2b",
            family="qwen2_vl",
            source=_Q2,
            config=f"{_Q2}/config.TangLinJie-Qwen2-VL-bm.partial.json",
            sizes={**_QWEN_TEXT, "max_window_layers": 2, **_QWEN2_VISION},
            removed=("_attn_implementation",),  # TangLinJie's one added line, not in the Hub file
            files={
                "tokenizer_config.json": f"{_Q2}/tokenizer_config.sophgo-LLM-TPU.partial.json",
                "chat_template.json": f"{_Q2}/chat_template.json",
                # Not found for 2B Instruct; the AWQ repo's (a re-save of Qwen2-VL-2B-Instruct) carries
                # the Instruct eos list [151645, 151643], so it is used here.
                "generation_config.json": f"{_QAWQ}/generation_config.json",
            },
            preprocessor=f"{_Q2}/preprocessor_config.sophgo-LLM-TPU.partial.json",
            preprocessor_sizes=_QWEN_PREPROCESSOR,
            special_tokens=_QWEN_SPECIAL,
            hf_class="Qwen2VLForConditionalGeneration",
            notes="TangLinJie's PARTIAL config minus its `_attn_implementation` line (probably the Hub file "
            "otherwise). Tied, vocab_size 151936. generation_config.json from the AWQ folder "
            "(eos_token_id [151645, 151643]).",
        ),
        HubSpec(
            name="qwen2_vl_2b_awq_layout",
            family="qwen2_vl",
            source=_QAWQ,
            config=f"{_QAWQ}/config.json",
            sizes={
                **_QWEN_TEXT,
                "max_window_layers": 2,
                "vision_config.hidden_size": 64,
            },
            # The re-saved vision_config is sparse (hidden_size, in_chans, model_type, spatial_patch_size):
            # depth / embed_dim / num_heads come from class defaults (32 / 1280 / 16), so the shrunk
            # values are ADDED (mlp_ratio, patch sizes etc. stay absent and default as in the real file).
            added={"vision_config.depth": 2, "vision_config.embed_dim": 32, "vision_config.num_heads": 2},
            # We serve unquantized: random fp weights under an AWQ quantization_config would be a lie
            # (and transformers would try to load AWQ kernels), so the block is dropped.
            removed=("quantization_config",),
            files={
                "tokenizer_config.json": f"{_QAWQ}/tokenizer_config.json",
                "chat_template.json": f"{_QAWQ}/chat_template.json",
                "generation_config.json": f"{_QAWQ}/generation_config.json",
                "added_tokens.json": f"{_QAWQ}/added_tokens.json",
                "special_tokens_map.json": f"{_QAWQ}/special_tokens_map.json",
            },
            preprocessor=f"{_QAWQ}/preprocessor_config.json",
            preprocessor_sizes={
                **_QWEN_PREPROCESSOR,
                "size.min_pixels": QWEN_MIN_PIXELS,
                "size.max_pixels": QWEN_MAX_PIXELS,
            },
            special_tokens=_QWEN_SPECIAL,
            hf_class="Qwen2VLForConditionalGeneration",
            notes="transformers-4.45-re-saved shape: sorted keys, 4-key sparse vision_config, rope_scaling "
            "with mrope_section first, torch_dtype float16, internal _name_or_path; quantization_config "
            "removed (served unquantized); re-saved preprocessor with `size`, `resample`, `vision_token_id`.",
        ),
        HubSpec(
            name="llava_1_5_hf",
            family="llava",
            source="llava-hf__llava-1.5-7b-hf",
            config="llava-hf__llava-1.5-7b-hf/config.json",
            sizes=_CLIP_VISION,
            added=_LLAMA_TEXT_ADDED,
            files={
                name: f"llava-hf__llava-1.5-7b-hf/{name}"
                for name in (
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "added_tokens.json",
                    "processor_config.json",
                    "chat_template.json",
                    "chat_template.jinja",
                    "generation_config.json",
                )
            },
            preprocessor="llava-hf__llava-1.5-7b-hf/preprocessor_config.json",
            preprocessor_sizes={
                "crop_size.height": LLAVA_IMAGE_SIZE,
                "crop_size.width": LLAVA_IMAGE_SIZE,
                "size.shortest_edge": LLAVA_IMAGE_SIZE,
            },
            index="llava-hf__llava-1.5-7b-hf/model.safetensors.index.json",
            special_tokens=_LLAVA_SPECIAL,
            hf_class="LlavaForConditionalGeneration",
            notes="Sparse nested text_config/vision_config; size keys ADDED to text_config (LlamaConfig "
            "defaults would give 4096 hidden). Weights in the legacy llava-hf layout "
            "(language_model.model.*, language_model.lm_head.weight, vision_tower.vision_model.*), 3 "
            "safetensors shards + index as the real repo. tokenizer.json is ours: a tiny sentencepiece-"
            "style (Metaspace, byte-fallback) BPE padded with filler entries to 32000 rows, then "
            "<image>=32000 and <pad>=32001; no tokenizer.model (it would disagree with the padded json).",
        ),
        HubSpec(
            name="llava_v1_6_mistral",
            family="llava_next",
            source="llava-hf__llava-v1.6-mistral-7b-hf",
            config="llava-hf__llava-v1.6-mistral-7b-hf/config.TensorRT-LLM-test-fixture.partial.json",
            sizes={
                **_CLIP_VISION,
                "text_config.intermediate_size": 128,
                "text_config.num_key_value_heads": 2,  # GQA kept: 32/8 -> 4/2
                # Tile multiples of the vision image_size (336 -> 56), else anyres would cut 12x12 tiles.
                "image_grid_pinpoints": _scaled_pinpoints(LLAVA_IMAGE_SIZE),
            },
            # MistralConfig defaults (4096 hidden, 32 layers, 32 heads) made explicit, shrunk.
            added={
                "text_config.hidden_size": 64,
                "text_config.num_hidden_layers": 2,
                "text_config.num_attention_heads": 4,
            },
            index=None,
            special_tokens=_LLAVA_SPECIAL,
            hf_class="LlavaNextForConditionalGeneration",
            notes="TensorRT-LLM test-fixture PARTIAL config (vision num_hidden_layers already 2 there; "
            "_name_or_path line absent). No tokenizer/processor/chat-template files exist in the reference: "
            "ours are INVENTED, modeled on llava-hf 1.5's (Mistral-like sentencepiece BPE with <unk> 0, "
            "<s> 1, </s> 2, <image> 32000, <pad> 32001; LlavaNextImageProcessor anyres with the scaled "
            "pinpoints; a `[INST] <image>\\n... [/INST]` template). Weights: llava-hf legacy layout + "
            "image_newline, safetensors shards + index (no real index to check against).",
        ),
        HubSpec(
            name="llava_v1_5_original",
            family="llava_original",
            source="liuhaotian__llava-v1.5-7b",
            config="liuhaotian__llava-v1.5-7b/config.json",
            sizes={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "num_key_value_heads": 4,  # MHA as the real 32/32
                "mm_hidden_size": 32,  # = the tiny CLIP tower's width
            },
            files={
                "tokenizer_config.json": "liuhaotian__llava-v1.5-7b/tokenizer_config.json",
                "special_tokens_map.json": "liuhaotian__llava-v1.5-7b/special_tokens_map.json",
                "generation_config.json": "liuhaotian__llava-v1.5-7b/generation_config.json",
            },
            index="liuhaotian__llava-v1.5-7b/pytorch_model.bin.index.json",
            weight_format="bin",
            special_tokens={"<unk>": 0, "<s>": 1, "</s>": 2},
            notes="Original LLaVA layout: flat Llama fields + mm_*, pytorch_model-0000N-of-0000M.bin shards "
            "+ index with model.layers.N.self_attn.rotary_emb.inv_freq buffers as the real shards. "
            "tokenizer.model is a tiny sentencepiece BPE trained offline (unk 0, bos 1, eos 2, byte "
            "fallback; vocab_size 32000 in config stays). mm_vision_tower 'openai/clip-vit-large-patch14-336' "
            "resolves to <out>/openai/clip-vit-large-patch14-336/: a tiny full CLIPModel (text + vision, "
            "model_type clip, as the openai repo) with an openai-style preprocessor_config.json (written "
            "by us: the openai files are not in the reference).",
        ),
        HubSpec(
            name="qwen_vl_chat",
            family="qwen_vl",
            source="Qwen__Qwen-VL-Chat",
            config="Qwen__Qwen-VL-Chat/config.json",
            sizes={
                # output_dim must equal hidden_size (the resampler feeds the LLM) and be >= 128
                # (the resampler has output_dim // 128 heads).
                "hidden_size": 128,
                "intermediate_size": 512,  # twice the MLP width (modeling_qwen: intermediate_size // 2)
                "kv_channels": 32,  # hidden_size / num_attention_heads
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "visual.heads": 2,
                "visual.image_size": 112,  # 8x8 patches; positional_embedding (256 = 16x16) is interpolated
                "visual.layers": 2,
                "visual.output_dim": 128,
                "visual.width": 32,  # mlp_ratio 4.9231 kept: c_fc width int(32 * 4.9231) = 157
            },
            files={
                "tokenizer_config.json": "Qwen__Qwen-VL-Chat/tokenizer_config.json",
                "generation_config.json": "Qwen__Qwen-VL-Chat/generation_config.json",
            },
            index="Qwen__Qwen-VL-Chat/pytorch_model.bin.index.json",
            weight_format="bin",
            special_tokens={
                "<|endoftext|>": 151643,
                "<|im_start|>": 151644,
                "<|im_end|>": 151645,
                "<img>": 151857,
                "</img>": 151858,
                "<imgpad>": 151859,
            },
            notes="Remote-code repo (auto_map; no chat template). qwen.tiktoken copied from the dashscope "
            "wheel (dashscope/resources/qwen.tiktoken); .bin shards + pytorch_model.bin.index.json.",
        ),
    ]
}


# --------------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------------


def _load_json(rel: str) -> Any:
    with open(REFERENCE_DIR / rel, encoding="utf-8") as f:
        return json.load(f)


def _set_path(d: dict, path: str, value: Any, *, must_exist: bool) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    if must_exist and last not in d:
        raise KeyError(f"{path} is not in the real file")
    if not must_exist and last in d:
        raise KeyError(f"{path} is already in the real file (use sizes)")
    d[last] = copy.deepcopy(value)


def _del_path(d: dict, path: str) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    del d[last]


def _resort(d: dict, original_keys: list[str]) -> dict:
    """Added keys go where a sorted dict would have them when the real dict is sorted, else last."""
    if original_keys == sorted(original_keys):
        return {k: d[k] for k in sorted(d)}
    return d


def shrink_config(spec: HubSpec) -> dict:
    """The real config.json of `spec` with its sizes replaced, documented keys added / removed."""
    cfg = _load_json(spec.config)
    for path in spec.removed:
        _del_path(cfg, path)
    for path, value in spec.sizes.items():
        _set_path(cfg, path, value, must_exist=True)
    parents_touched: dict[str, list[str]] = {}
    for path in spec.added:
        parent = path.rpartition(".")[0]
        node = cfg
        for p in parent.split(".") if parent else []:
            node = node[p]
        parents_touched.setdefault(parent, list(node))
    for path, value in spec.added.items():
        _set_path(cfg, path, value, must_exist=False)
    for parent, keys in parents_touched.items():
        if parent:
            *up, last = parent.split(".")
            node = cfg
            for p in up:
                node = node[p]
            node[last] = _resort(node[last], keys)
        else:
            cfg = _resort(cfg, keys)
    return cfg


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _shrunk_json(rel: str, sizes: Mapping[str, Any]) -> dict:
    data = _load_json(rel)
    for path, value in sizes.items():
        _set_path(data, path, value, must_exist=True)
    return data


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def dashscope_tiktoken() -> Path:
    """qwen.tiktoken from the installed dashscope wheel (dashscope/resources/qwen.tiktoken), found
    without importing dashscope (its import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("qwen.tiktoken not found: `pip install dashscope`")
    return path


def _cache_dir() -> Path:
    home = Path(os.environ.get("MMSERVE_HOME", Path.home() / ".cache" / "mmserve"))
    return home / "qwen-tokenizers"


@functools.lru_cache(maxsize=1)
def _qwen_bpe_json() -> str:
    """qwen.tiktoken as a `tokenizers` JSON with an empty `added_tokens` list.

    The BPE comes from gateway.qwen_tokenizer (the Qwen-VL v1 conversion, itself cached on disk); its v1
    special tokens (<|extra_N|>, <img> ...) are dropped here. Qwen2's vocabulary is the same 151,643
    byte-level ranks, and its pre-tokenizer regex (transformers' qwen2 PRETOKENIZE_REGEX) is character
    for character Qwen v1's PAT_STR: checked here. Differences from the real Qwen2 tokenizer.json:
    `ignore_merges` true (tiktoken semantics; the same ids) and no ByteLevel post-processor (offsets only).
    Cached under $MMSERVE_HOME/qwen-tokenizers next to the gateway's cache (the conversion takes ~10 s).
    """
    import hashlib
    import tempfile

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from gateway.qwen_tokenizer import PAT_STR, load_qwen_tokenizer

    if PRETOKENIZE_REGEX != PAT_STR:  # pragma: no cover - would need Qwen2's own regex here
        raise AssertionError("Qwen2's pre-tokenizer regex differs from Qwen v1's PAT_STR")
    tiktoken = dashscope_tiktoken()
    digest = hashlib.sha256(tiktoken.read_bytes() + PAT_STR.encode() + b"qwen2-base-1").hexdigest()[:32]
    cached = _cache_dir() / f"qwen2-base-{digest}.json"
    try:
        return cached.read_text(encoding="utf-8")
    except OSError:
        pass
    data = json.loads(load_qwen_tokenizer(tiktoken.parent).backend_tokenizer.to_str())
    data["added_tokens"] = []
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=cached.parent, delete=False, suffix=".tmp", encoding="utf-8"
        ) as f:
            f.write(text)
        os.replace(f.name, cached)
    except OSError:
        pass
    return text


def qwen2_tokenizer_json(tokenizer_config: Mapping[str, Any]) -> str:
    """tokenizer.json for Qwen2(.5)-VL: the real qwen.tiktoken BPE plus the real `added_tokens_decoder`
    (ids 151643..), special flags as in tokenizer_config.json."""
    base = _qwen_bpe_json()
    added = []
    for key, tok in sorted(tokenizer_config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
        if int(key) < 151643:
            raise ValueError(f"added token {tok['content']} id {key} collides with the BPE ranks")
        added.append(
            {
                "id": int(key),
                "content": tok["content"],
                "single_word": tok.get("single_word", False),
                "lstrip": tok.get("lstrip", False),
                "rstrip": tok.get("rstrip", False),
                "normalized": tok.get("normalized", False),
                "special": tok.get("special", True),
            }
        )
    empty = '"added_tokens":[]'
    if empty not in base[:200]:
        raise AssertionError("unexpected tokenizer JSON layout")
    return base.replace(empty, '"added_tokens":' + json.dumps(added, ensure_ascii=False), 1)


def _corpus() -> list[str]:
    from tools.checkpoints import corpus

    return corpus() + [
        "[INST] What is shown in this picture? [/INST]",
        "A chat between a curious human and an artificial intelligence assistant.",
        "USER: Describe the image in detail. ASSISTANT: The image shows a small cat.",
    ]


@functools.lru_cache(maxsize=2)
def train_sentencepiece(vocab_size: int = 600) -> bytes:
    """A tiny Llama-style sentencepiece BPE model (serialized): unk 0, bos 1, eos 2, 256 byte-fallback
    pieces, add_dummy_prefix, identity normalization, split digits, as Llama's tokenizer.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() * 3),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buf.getvalue()


def llama_tokenizer_json(pad_to: int = 32000, added: Mapping[str, int] | None = None) -> str:
    """tokenizer.json of a Llama-style (Metaspace, byte-fallback BPE) tokenizer: the tiny sentencepiece
    model converted the way transformers converts Llama's, its vocabulary padded with never-produced
    filler entries `<filler_N>` up to `pad_to`, then `added` special tokens at their real ids."""
    import tempfile

    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tokenizer.model"
        model.write_bytes(train_sentencepiece())
        extracted = SentencePieceExtractor(str(model)).extract(None)
    vocab, merges = extracted["vocab"], extracted["merges"]
    vocab = dict(vocab)
    for i in range(len(vocab), pad_to):
        vocab[f"<filler_{i}>"] = i
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    backend = tok.backend_tokenizer
    data = json.loads(backend.to_str())
    specials = [{"id": i, "content": c} for c, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))]
    specials += [{"id": i, "content": c} for c, i in (added or {}).items()]
    if sorted((added or {}).values()) != list(range(pad_to, pad_to + len(added or {}))):
        raise ValueError(f"added tokens {added} must take the ids right after the padded vocabulary")
    # Added tokens live only in `added_tokens` (ids past the model vocabulary), as in Llama's file.
    data["added_tokens"] = [
        {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True, **s}
        for s in specials
    ]
    return json.dumps(data, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _torch_dtype(spec_dtype: str | None, config: Mapping[str, Any]):
    import torch

    name = spec_dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def _random_model(model_class, config, seed: int):
    """tools.checkpoints.random_model, widened from a generator of its own seeded `seed`."""
    import torch

    from tools.checkpoints import random_model

    generator = torch.Generator().manual_seed(seed)
    return random_model(model_class, config, seed, ("embed_tokens", "lm_head"), generator)


def collapse_layers(keys) -> set[str]:
    """Weight names with every `.N.` layer number replaced by `.N.` (the key set modulo depth)."""
    import re

    return {re.sub(r"\.\d+(?=\.)", ".N", k) for k in keys}


def save_weights(state: Mapping[str, Any], out: Path, fmt: str, per_shard: int = 16) -> dict[str, str]:
    """Shards of `per_shard` tensors (at least two shards) + the index, named as the Hub repos name them."""
    import torch

    keys = list(state)
    n_shards = max(2, math.ceil(len(keys) / per_shard))
    size = math.ceil(len(keys) / n_shards)
    chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
    n_shards = len(chunks)
    weight_map: dict[str, str] = {}
    total = 0
    for n, chunk in enumerate(chunks, 1):
        tensors = {k: state[k].detach().contiguous() for k in chunk}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if fmt == "safetensors":
            from safetensors.torch import save_file

            fname = f"model-{n:05d}-of-{n_shards:05d}.safetensors"
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
        elif fmt == "bin":
            fname = f"pytorch_model-{n:05d}-of-{n_shards:05d}.bin"
            torch.save(tensors, out / fname)
        else:
            raise ValueError(fmt)
        weight_map.update({k: fname for k in chunk})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    _write_json(
        out / index, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    )
    return weight_map


def _rename(state: Mapping[str, Any], prefixes: list[tuple[str, str]]) -> dict[str, Any]:
    renamed = {}
    for k, v in state.items():
        for old, new in prefixes:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        else:
            raise KeyError(f"unexpected weight name {k}")
        renamed[k] = v
    return renamed


def _native_state(out: Path, cls_name: str, seed: int, dtype, renames: list[tuple[str, str]], tied: bool):
    """transformers' own model from the written config.json, widened random init, Hub key names."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    model = _random_model(getattr(transformers, cls_name), config, seed)
    if tied:
        model.tie_weights()
    state = dict(model.state_dict())
    if tied:
        state.pop("lm_head.weight")
    state = _rename(state, renames)
    return {k: v.to(dtype) for k, v in state.items()}


def _check_against_index(spec: HubSpec, keys) -> None:
    if spec.index is None:
        return
    real = collapse_layers(_load_json(spec.index)["weight_map"])
    ours = collapse_layers(keys)
    if real != ours:
        raise AssertionError(
            f"{spec.name}: weight names differ from {spec.index}: "
            f"missing {sorted(real - ours)}, extra {sorted(ours - real)}"
        )


# --------------------------------------------------------------------------------------------------
# Family builders
# --------------------------------------------------------------------------------------------------


def _copy_files(spec: HubSpec, out: Path) -> None:
    for name, rel in spec.files.items():
        shutil.copyfile(REFERENCE_DIR / rel, out / name)
    if spec.preprocessor:
        _write_json(
            out / "preprocessor_config.json", _shrunk_json(spec.preprocessor, spec.preprocessor_sizes)
        )


def _build_qwen2(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(qwen2_tokenizer_json(tok_cfg), encoding="utf-8")
    tied = bool(cfg.get("tie_word_embeddings", False))
    state = _native_state(
        out,
        spec.hf_class or "",
        seed,
        dtype,
        [("model.visual.", "visual."), ("model.language_model.", "model."), ("lm_head.", "lm_head.")],
        tied,
    )
    save_weights(state, out, "safetensors")


def _llava_hf_renames() -> list[tuple[str, str]]:
    return [
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),  # if a 5.x release nests it
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
    ]


def _build_llava_hf(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
    added = json.loads((out / "added_tokens.json").read_text())
    (out / "tokenizer.json").write_text(llama_tokenizer_json(32000, added), encoding="utf-8")
    state = _native_state(out, spec.hf_class or "", seed, dtype, _llava_hf_renames(), False)
    _check_against_index(spec, state)
    save_weights(state, out, "safetensors", per_shard=max(8, math.ceil(len(state) / 3)))


# A Mistral-instruct-style template in llava-hf's typed-content form (the real llava-v1.6-mistral-7b-hf
# template is not in the reference): "[INST] <image>\nWhat is this? [/INST]".
LLAVA_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] }}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}"
)


def _build_llava_next(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
    # Tokenizer / processor files are invented (none in the reference), modeled on llava-hf 1.5's.
    added = {"<image>": 32000, "<pad>": 32001}
    (out / "tokenizer.json").write_text(llama_tokenizer_json(32000, added), encoding="utf-8")
    real_tok_cfg = _load_json("llava-hf__llava-1.5-7b-hf/tokenizer_config.json")
    tok_cfg = {**real_tok_cfg, "processor_class": "LlavaNextProcessor"}
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "added_tokens.json", added)
    shutil.copyfile(
        REFERENCE_DIR / "llava-hf__llava-1.5-7b-hf/special_tokens_map.json", out / "special_tokens_map.json"
    )
    _write_json(
        out / "processor_config.json",
        {
            **_load_json("llava-hf__llava-1.5-7b-hf/processor_config.json"),
            "processor_class": "LlavaNextProcessor",
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": LLAVA_MISTRAL_CHAT_TEMPLATE})
    side = cfg["vision_config"]["image_size"]
    _write_json(
        out / "preprocessor_config.json",
        {
            "aspect_ratio_setting": "anyres",
            "crop_size": {"height": side, "width": side},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_grid_pinpoints": cfg["image_grid_pinpoints"],
            "image_mean": _CLIP_MEAN,
            "image_processor_type": "LlavaNextImageProcessor",
            "image_std": _CLIP_STD,
            "processor_class": "LlavaNextProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": side},
        },
    )
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001})
    state = _native_state(out, spec.hf_class or "", seed, dtype, _llava_hf_renames(), False)
    save_weights(state, out, "safetensors", per_shard=max(8, math.ceil(len(state) / 4)))


CLIP_TOWER_DIR = "openai/clip-vit-large-patch14-336"


def _build_clip_tower(out: Path, width: int, seed: int) -> None:
    """A tiny openai/clip-vit-large-patch14-336 look-alike: a full CLIPModel (text + vision towers,
    model_type clip) saved with transformers, plus the openai repo's preprocessor_config.json shape
    (int `size` / `crop_size`, CLIPFeatureExtractor) with 56 px instead of 336."""
    from transformers import CLIPConfig, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": width,
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": LLAVA_IMAGE_SIZE,
            "patch_size": 14,
            "projection_dim": width,
        },
        projection_dim=width,
    )
    model = _random_model(CLIPModel, config, seed + 1)
    model.save_pretrained(out)
    _write_json(
        out / "preprocessor_config.json",
        {
            "crop_size": LLAVA_IMAGE_SIZE,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "resample": 3,
            "size": LLAVA_IMAGE_SIZE,
        },
    )


def _build_llava_original(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    (out / "tokenizer.model").write_bytes(train_sentencepiece())
    skip = {"architectures", "model_type", "transformers_version", "torch_dtype", "_name_or_path"}
    text = LlamaConfig(**{k: v for k, v in cfg.items() if k not in skip and not k.startswith("mm_")})
    lm = _random_model(LlamaForCausalLM, text, seed)
    state: dict[str, Any] = {}
    head_dim = text.hidden_size // text.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for k, v in lm.state_dict().items():
        state[k] = v
        if k.endswith("self_attn.v_proj.weight"):  # the 4.31-era shards kept the RoPE buffer per layer
            state[k.replace("v_proj.weight", "rotary_emb.inv_freq")] = inv_freq.clone()
    g = torch.Generator().manual_seed(seed + 2)
    mm, hidden = cfg["mm_hidden_size"], cfg["hidden_size"]
    if cfg.get("mm_projector_type") != "mlp2x_gelu":
        raise ValueError("only mlp2x_gelu is built")
    state["model.mm_projector.0.weight"] = torch.randn(hidden, mm, generator=g) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(hidden, generator=g) * 0.05
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden, generator=g) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(hidden, generator=g) * 0.05
    state = {k: v.to(dtype) for k, v in state.items()}
    _check_against_index(spec, state)
    save_weights(state, out, "bin", per_shard=12)
    if cfg["mm_vision_tower"] != CLIP_TOWER_DIR:
        raise ValueError(f"unexpected mm_vision_tower {cfg['mm_vision_tower']!r}")
    _build_clip_tower(out / CLIP_TOWER_DIR, mm, seed)


def _build_qwen_vl(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
    from tests.checkpoints.qwen_vl import QwenVLShape, random_weights

    shutil.copyfile(dashscope_tiktoken(), out / "qwen.tiktoken")
    v = cfg["visual"]
    if v["output_dim"] != cfg["hidden_size"] or v["output_dim"] < 128:
        raise ValueError("visual.output_dim must equal hidden_size and be >= 128")
    shape = QwenVLShape(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        vision_width=v["width"],
        vision_layers=v["layers"],
        vision_heads=v["heads"],
        mlp_ratio=v["mlp_ratio"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        seq_length=cfg["seq_length"],
    )
    state = {k: t.to(dtype) for k, t in random_weights(shape, seed).items()}
    _check_against_index(spec, state)
    save_weights(state, out, "bin", per_shard=12)


_BUILDERS = {
    "qwen2_vl": _build_qwen2,
    "qwen2_5_vl": _build_qwen2,
    "llava": _build_llava_hf,
    "llava_next": _build_llava_next,
    "llava_original": _build_llava_original,
    "qwen_vl": _build_qwen_vl,
}


def build_from_hub(name: str, out: Path, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Write the tiny checkpoint `name` (a HUB_CONFIGS key) into folder `out` and return it.

    dtype None saves the weights in the config's `torch_dtype` (as the real repo does); "float32",
    "float16" or "bfloat16" override it (config.json keeps its real `torch_dtype` either way).
    """
    spec = HUB_CONFIGS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = shrink_config(spec)
    _write_json(out / "config.json", cfg)
    _copy_files(spec, out)
    _BUILDERS[spec.family](spec, out, cfg, seed, _torch_dtype(dtype, cfg))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(HUB_CONFIGS))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    print(build_from_hub(args.name, Path(args.out), seed=args.seed, dtype=args.dtype))


if __name__ == "__main__":
    main()
