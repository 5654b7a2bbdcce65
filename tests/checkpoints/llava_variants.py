"""Tiny random-weight checkpoints of the other LLaVA layouts, built offline for the tests.

- `build_llava_next_checkpoint`: a llava-hf `LlavaNextForConditionalGeneration` checkpoint (anyres tiling,
  image_newline) with its `LlavaNextProcessor`.
- `build_llava_original_checkpoint`: the original haotian-liu/LLaVA layout (LLaMA weights +
  `model.mm_projector.*`, `mm_vision_tower` naming a separate CLIP folder), derived from the weights of an
  equivalent llava-hf checkpoint, so that transformers' `LlavaForConditionalGeneration` on the latter is a
  reference for the former.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tools.checkpoints import (
    LlavaShape,
    build_llava_checkpoint,
    write_marker,
)

# The vicuna_v1 system line of the original LLaVA conversation templates.
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def default_grid_pinpoints(image_size: int) -> list[list[int]]:
    """llava-hf's default pinpoints ([[336, 672], [672, 336], ...]) scaled to `image_size`."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def build_llava_next_checkpoint(
    path: str | Path,
    shape: LlavaShape | None = None,
    seed: int = 0,
    grid_pinpoints: list[list[int]] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight `LlavaNextForConditionalGeneration` checkpoint with tokenizer and processor
    (llava-hf's default pinpoints at the shape's image size unless `grid_pinpoints` are given)."""
    side = (shape or LlavaShape()).image_size
    return build_llava_checkpoint(path, shape, seed, dtype, grid_pinpoints or default_grid_pinpoints(side))


def build_llava_original_checkpoint(
    path: str | Path,
    hf_path: str | Path,
    clip_path: str | Path | None = None,
    shape: LlavaShape | None = None,
    seed: int = 0,
    image_aspect_ratio: str = "pad",
    mm_use_im_start_end: bool = False,
    relative_tower_path: bool = True,
) -> Path:
    """Write an original-LLaVA-layout checkpoint at `path` and its CLIP tower folder at `clip_path`.

    `hf_path` receives the equivalent llava-hf checkpoint (built with the same seed and shape): the two
    hold the same weights, so they must give the same tokens. `mm_vision_tower` names the CLIP folder
    relative to the checkpoint folder unless `relative_tower_path` is False.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    shape = shape or LlavaShape()
    if mm_use_im_start_end:  # room in the embeddings for <im_start> and <im_end>
        shape = replace(shape, model_vocab_size=max(shape.model_vocab_size or 0, shape.vocab_size + 8))
    path, hf_path = Path(path), Path(hf_path)
    clip_path = Path(clip_path) if clip_path else path.parent / f"{path.name}-clip"
    build_llava_checkpoint(hf_path, shape, seed=seed)
    hf = LlavaForConditionalGeneration.from_pretrained(hf_path, dtype=torch.float32)
    _save_clip_tower(hf, shape.image_size, clip_path)
    path.mkdir(parents=True, exist_ok=True)
    _save_original_weights(hf, path)
    tower_ref = os.path.relpath(clip_path, path) if relative_tower_path else str(clip_path.resolve())
    config = _original_config(hf.config, shape, tower_ref, mm_use_im_start_end, image_aspect_ratio)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _save_original_tokenizer(hf_path, path, mm_use_im_start_end)
    write_marker(path, seed, llava_hf=str(hf_path), **asdict(shape))
    return path


def _save_clip_tower(hf, side: int, clip_path: Path) -> None:
    """The CLIP tower of llava-hf model `hf` as its own checkpoint, with the CLIP image processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    tower = CLIPVisionModel(hf.config.vision_config)
    tower.load_state_dict(hf.model.vision_tower.state_dict(), strict=True)
    tower.save_pretrained(clip_path)
    CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(clip_path)


def _save_original_weights(hf, path: Path) -> None:
    """LLaMA weights + model.mm_projector.{0,2}.* (mlp2x_gelu: index 1 is the GELU)."""
    from safetensors.torch import save_file

    state = {f"model.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight
    projector = hf.model.multi_modal_projector
    state["model.mm_projector.0.weight"] = projector.linear_1.weight
    state["model.mm_projector.0.bias"] = projector.linear_1.bias
    state["model.mm_projector.2.weight"] = projector.linear_2.weight
    state["model.mm_projector.2.bias"] = projector.linear_2.bias
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def _original_config(
    hf_config: Any, shape: LlavaShape, tower_ref: str, mm_use_im_start_end: bool, image_aspect_ratio: str
) -> dict:
    """config.json of the original layout: the LLaMA text config plus the mm_* keys."""
    text = hf_config.text_config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype", "_name_or_path"):
        text.pop(key, None)
    return {
        **text,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": tower_ref,
        "mm_hidden_size": shape.vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": hf_config.vision_feature_layer,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": mm_use_im_start_end,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": image_aspect_ratio,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def _save_original_tokenizer(hf_path: Path, path: Path, mm_use_im_start_end: bool) -> None:
    """The llava-hf tokenizer without a chat template (original checkpoints ship none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    if mm_use_im_start_end:
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    for leftover in ("chat_template.jinja", "chat_template.json"):
        (path / leftover).unlink(missing_ok=True)
