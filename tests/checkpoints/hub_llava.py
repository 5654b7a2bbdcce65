"""The LLaVA families' tiny checkpoints from the real Hub files (tests/checkpoints/hub.py's builders for
llava-hf 1.5, LLaVA-NeXT and the original LLaVA with its CLIP tower folder)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from tests.checkpoints.hub_specs import (
    _CLIP_MEAN,
    _CLIP_STD,
    LLAVA_IMAGE_SIZE,
    REFERENCE_DIR,
    HubSpec,
    load_json,
    write_json,
)
from tests.checkpoints.hub_tokenizers import llama_tokenizer_json, train_sentencepiece
from tests.checkpoints.hub_weights import _check_against_index, _native_state, _random_model, save_weights


def _llava_hf_renames() -> list[tuple[str, str]]:
    return [
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),  # if a 5.x release nests it
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
    ]


def build_llava_hf(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
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


def build_llava_next(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
    # Tokenizer / processor files are invented (none in the reference), modeled on llava-hf 1.5's.
    added = {"<image>": 32000, "<pad>": 32001}
    (out / "tokenizer.json").write_text(llama_tokenizer_json(32000, added), encoding="utf-8")
    real_tok_cfg = load_json("llava-hf__llava-1.5-7b-hf/tokenizer_config.json")
    tok_cfg = {**real_tok_cfg, "processor_class": "LlavaNextProcessor"}
    write_json(out / "tokenizer_config.json", tok_cfg)
    write_json(out / "added_tokens.json", added)
    shutil.copyfile(
        REFERENCE_DIR / "llava-hf__llava-1.5-7b-hf/special_tokens_map.json", out / "special_tokens_map.json"
    )
    write_json(
        out / "processor_config.json",
        {
            **load_json("llava-hf__llava-1.5-7b-hf/processor_config.json"),
            "processor_class": "LlavaNextProcessor",
        },
    )
    write_json(out / "chat_template.json", {"chat_template": LLAVA_MISTRAL_CHAT_TEMPLATE})
    side = cfg["vision_config"]["image_size"]
    write_json(
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
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001})
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
    write_json(
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


def build_llava_original(spec: HubSpec, out: Path, cfg: dict, seed: int, dtype) -> None:
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
