"""What `python -m mmserve inspect` reports about a checkpoint beyond the start-up checks: dtype, image
token id, tokens per image, context length, chat template content format, generation defaults."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from mmserve.checkpoint_check import CheckpointSummary, is_hub_id, served_dtype, validate_checkpoint
from mmserve.cli import one_line

# Qwen-VL v1's `<imgpad>`: a fixed id of its tiktoken vocabulary (llm_service/models/qwen_vl.py IMG_PAD_ID).
QWEN_VL_IMG_PAD_ID = 151859

# Text models' max_position_embeddings when config.json leaves it out (transformers' defaults).
_DEFAULT_MAX_POSITIONS = {
    "llama": 2048,
    "mistral": 131072,
    "qwen2": 32768,
    "qwen2_vl": 32768,
    "qwen2_5_vl": 128000,
}
# Vision towers' (image_size, patch_size) when config.json leaves them out (transformers' defaults).
_DEFAULT_TOWER = {"clip_vision_model": (224, 32), "siglip_vision_model": (224, 16)}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_name(folder: Path, token_id: int) -> str | None:
    for added in _read_json(folder / "tokenizer.json").get("added_tokens") or []:
        if isinstance(added, dict) and added.get("id") == token_id:
            return added.get("content")
    entry = (_read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).get(
        str(token_id)
    )
    return entry.get("content") if isinstance(entry, dict) else None


def image_token_id(summary: CheckpointSummary) -> tuple[int | None, str]:
    """(id, note) of the placeholder token an image's embedding rows take in the prompt."""
    config, folder = summary.config, Path(summary.path)
    if summary.family == "qwen_vl":
        return QWEN_VL_IMG_PAD_ID, "<imgpad>"
    if summary.family == "llava_original":
        try:
            from transformers import AutoTokenizer

            from mmserve.llava_original import image_placeholder_id

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            token_id = image_placeholder_id(tokenizer)
            return token_id, str(tokenizer.convert_ids_to_tokens(token_id))
        except Exception as exc:  # noqa: BLE001 - a report, not a start-up check
            return None, f"unknown (the tokenizer does not load: {one_line(exc)[:200]})"
    value = config.get("image_token_id", config.get("image_token_index"))
    if value is None:
        return None, "unknown (config.json has no image_token_id / image_token_index)"
    return int(value), _token_name(folder, int(value)) or ""


def _tower_geometry(vision_config: dict | None) -> tuple[int, int]:
    if vision_config is None:  # llava-hf's default tower: CLIP ViT-L/14 at 336 px
        return 336, 14
    default = _DEFAULT_TOWER.get(vision_config.get("model_type", "clip_vision_model"), (224, 32))
    return int(vision_config.get("image_size", default[0])), int(vision_config.get("patch_size", default[1]))


def _original_tower(summary: CheckpointSummary) -> tuple[int, int, str] | None:
    """(image_size, patch_size, where from) of an original LLaVA checkpoint's CLIP tower: its config.json
    when the tower is on disk (a folder or the Hugging Face cache; never downloaded here), else the
    tower's name (`...-patch14-336`)."""
    name = str(summary.config.get("mm_vision_tower", ""))
    folder = Path(summary.path)
    candidates = [Path(name)] if Path(name).is_absolute() else [folder / name, Path(name)]
    found = [c / "config.json" for c in candidates if (c / "config.json").is_file()]
    if not found and is_hub_id(name):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            if isinstance(cached, str):
                found = [Path(cached)]
        except Exception:  # noqa: BLE001 - no cache, no answer
            pass
    if found:
        tower = _read_json(found[0])
        size, patch = _tower_geometry(tower.get("vision_config", tower) or {})
        return size, patch, f"the CLIP tower's config ({found[0].parent})"
    match = re.search(r"patch(\d+)(?:-(\d+))?", name)
    if match:
        return int(match.group(2) or 224), int(match.group(1)), f"the tower's name {name!r} (not on disk)"
    return None


def tokens_per_image(summary: CheckpointSummary) -> tuple[int | None, str]:
    """(fixed count or None when dynamic, description)."""
    config, family = summary.config, summary.family
    if family == "qwen_vl":
        n = int((config.get("visual") or {}).get("n_queries", 256))
        return n, f"{n} (fixed: the resampler's queries)"
    if family in ("qwen2_vl", "qwen2_5_vl"):
        pre = _read_json(Path(summary.path) / "preprocessor_config.json")
        bounds: dict = pre["size"] if isinstance(pre.get("size"), dict) else {}
        low = int(pre.get("min_pixels") or bounds.get("shortest_edge") or 56 * 56)
        high = int(pre.get("max_pixels") or bounds.get("longest_edge") or 28 * 28 * 1280)
        unit = int(pre.get("patch_size", 14)) * int(pre.get("merge_size", 2))
        source = (
            "preprocessor_config.json" if pre else "the processor's defaults (no preprocessor_config.json)"
        )
        return None, (
            f"dynamic: min_pixels {low}..max_pixels {high} -> {max(1, low // unit**2)}..{high // unit**2} tokens "
            f"({unit}x{unit} px per token, {source}; VISION_MIN_PIXELS / VISION_MAX_PIXELS and requests may change the bounds)"
        )
    if family == "llava_original":
        tower = _original_tower(summary)
        cls = config.get("mm_vision_select_feature", "patch") == "cls_patch"
        if tower is None:
            return None, f"unknown (mm_vision_tower={config.get('mm_vision_tower')!r} is not on disk)"
        size, patch, source = tower
        n = (size // patch) ** 2 + int(cls)
        return n, f"{n} (({size}/{patch})^2{' + 1 (cls_patch)' if cls else ''}, from {source})"
    size, patch = _tower_geometry(config.get("vision_config"))
    strategy = config.get("vision_feature_select_strategy", "default")
    full = strategy == "full"
    base = (size // patch) ** 2 + int(full)
    if family == "llava_next":
        pinpoints = config.get("image_grid_pinpoints") or []
        side = size // patch
        most = max((int(h) // patch) * (int(w) // patch + 1) for h, w in pinpoints) if pinpoints else 0
        return None, (
            f"dynamic (anyres): {base} for the whole image + the tiles of the best fitting of {len(pinpoints)} grid "
            f"pinpoints {pinpoints} ({side}x{side} per {size} px tile, unpadded, a newline token per row): "
            f"up to {base + most}"
        )
    return (
        base,
        f"{base} (({size}/{patch})^2{' + 1' if full else ''}, vision_feature_select_strategy={strategy})",
    )


def context_length(summary: CheckpointSummary) -> tuple[int | None, str]:
    """The model's own context length, from the model config (never the tokenizer's model_max_length)."""
    config, family = summary.config, summary.family
    if family == "qwen_vl":
        seq = int(config.get("seq_length", 2048))
        return seq, (
            f"seq_length (served exactly only up to it; max_position_embeddings "
            f"{config.get('max_position_embeddings', 8192)} needs logn/NTK scaling, which is not served)"
        )
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    if text is not None and "max_position_embeddings" in text:
        source, where = text, "text_config."
    elif family in ("llava", "llava_next"):  # the text model's config only (llava-hf's default: Llama)
        source, where = text or {}, "text_config."
    else:  # original LLaVA and Qwen2-VL keep (some of) the text model's keys at the top level
        source, where = config, ""
    text_type = source.get("model_type") or "llama"
    if "max_position_embeddings" in source:
        n, note = int(source["max_position_embeddings"]), f"{where}max_position_embeddings"
    elif text_type in _DEFAULT_MAX_POSITIONS:
        n, note = _DEFAULT_MAX_POSITIONS[text_type], f"{text_type}'s default (config.json does not set it)"
    else:
        return None, "unknown (config.json has no max_position_embeddings)"
    window = source.get("sliding_window")
    if window and (text_type == "mistral" or source.get("use_sliding_window")) and int(window) < n:
        return int(window), f"sliding_window (below {note} {n})"
    return n, note


def chat_template_format(summary: CheckpointSummary) -> str:
    if summary.family == "llava_original":
        return "built in (vicuna_v1 conversation; no checkpoint template)"
    if summary.family == "qwen_vl":
        return "built in (ChatML)"
    try:
        from gateway.chat_template import load_chat_template
        from gateway.template_format import detect_content_format
    except ImportError:
        return "unknown (gateway.chat_template is not available)"
    folder = Path(summary.path)
    try:
        own = _read_json(folder / "tokenizer_config.json").get("chat_template")
        template = load_chat_template(str(folder), SimpleNamespace(chat_template=own), None)
        if not template:
            return "none (no chat template in the checkpoint; use --chat-template or /v1/completions)"
        return detect_content_format(template)
    except Exception as exc:  # noqa: BLE001 - a report: say why it is unknown
        return f"unknown ({one_line(exc)[:200]})"


def describe(path: str | Path, model_type: str | None = None) -> dict:
    """Everything `inspect` prints, as a JSON-ready dict. CheckpointError when mmserve cannot serve it."""
    from mmserve.checkpoint import generation_config

    summary = validate_checkpoint(path, model_type)
    token_id, token_note = image_token_id(summary)
    tokens, tokens_note = tokens_per_image(summary)
    length, length_note = context_length(summary)
    return {
        "checkpoint": summary.path,
        "family": summary.family,
        "model_type": summary.model_type,
        "architectures": summary.architectures,
        "dtype": {"checkpoint": summary.checkpoint_dtype, "served_on_cpu": served_dtype(summary.path)},
        "image_token_id": token_id,
        "image_token": token_note,
        "tokens_per_image": tokens,
        "tokens_per_image_detail": tokens_note,
        "context_length": length,
        "context_length_source": length_note,
        "chat_template_content_format": chat_template_format(summary),
        "generation_config": {
            k: v
            for k, v in generation_config(summary.path).items()
            if not k.startswith("_") and k != "transformers_version"
        },
        "weights": [asdict(w) for w in summary.weights],
        "weights_total_bytes": summary.total_bytes,
    }
