"""The Hub checkpoints the tests build tiny copies of: one HubSpec per reference folder (sizes replaced,
keys added or removed, files copied); tests/checkpoints/hub.py builds them."""

from __future__ import annotations

import json
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


def load_json(rel: str) -> Any:
    with open(REFERENCE_DIR / rel, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
