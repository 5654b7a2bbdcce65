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
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.checkpoints.hub_specs import (
    _CLIP_MEAN,
    _CLIP_STD,
    HUB_CONFIGS,
    LLAVA_IMAGE_SIZE,
    REFERENCE_DIR,
    HubSpec,
    load_json,
    write_json,
)
from tests.checkpoints.hub_tokenizers import llama_tokenizer_json, qwen2_tokenizer_json, train_sentencepiece
from tests.checkpoints.hub_weights import (
    _check_against_index,
    _native_state,
    _random_model,
    _torch_dtype,
    save_weights,
)
from tests.checkpoints.qwen_vl import dashscope_tiktoken

# --------------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------------


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
    cfg = load_json(spec.config)
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


def _shrunk_json(rel: str, sizes: Mapping[str, Any]) -> dict:
    data = load_json(rel)
    for path, value in sizes.items():
        _set_path(data, path, value, must_exist=True)
    return data


# --------------------------------------------------------------------------------------------------
# Family builders
# --------------------------------------------------------------------------------------------------


def _copy_files(spec: HubSpec, out: Path) -> None:
    for name, rel in spec.files.items():
        shutil.copyfile(REFERENCE_DIR / rel, out / name)
    if spec.preprocessor:
        write_json(out / "preprocessor_config.json", _shrunk_json(spec.preprocessor, spec.preprocessor_sizes))


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
    write_json(out / "config.json", cfg)
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
