"""What mmserve would serve from a checkpoint folder, without loading any weights.

    python -m mmserve inspect /models/llava-1.5-7b-hf [--json] [--model-type llava]

`resolve_checkpoint_path` (a folder or a Hub repo id, never a path sent to the Hub as an id) and
`validate_checkpoint` (config.json readable, family known, weights present with readable headers) are the
launcher's start-up checks too: `mmserve.start_server` runs them before it starts any service process.
`describe` adds what `inspect` reports: dtype, image token id, tokens per image, context length, chat
template content format, generation defaults, weight files. Weight files are only stat'ed and, for
safetensors, their JSON header read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from mmserve.cli import StartupError, one_line
from mmserve.errors import CheckpointError

# A Hugging Face Hub repo id, as the Hub validates them: `name` or `org/name`, each part of letters, digits,
# `-`, `_` and `.`, not starting or ending with `-` or `.`, no `--` or `..`, at most 96 characters.
# Anything else (`/abs`, `./rel`, `../rel`, `~/x`, `a/b/c`, a backslash or a drive letter) is a local path
# and is never sent to the Hub.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")

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


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name


def resolve_checkpoint_path(
    name: str, variable: str | None = "CHECKPOINT_PATH", download: bool = True
) -> tuple[str, bool]:
    """(local folder, came from the Hub) for `name`: a folder holding config.json, else a Hub repo id
    (downloaded, or with `download=False` only looked up in the local Hugging Face cache). A StartupError
    naming `variable`, the path and what is missing otherwise."""
    what = f"{variable}={name}" if variable else name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StartupError(
                f"{what}: the folder has no config.json (a Hugging Face checkpoint folder holds "
                "config.json and the weights)"
            )
        return str(path.resolve()), False
    if path.exists():
        raise StartupError(f"{what}: is a file; expected a checkpoint folder (config.json + weights)")
    if not is_hub_id(name):
        raise StartupError(
            f"{what}: no such folder (and not a Hugging Face Hub repo id, which is `name` or `org/name`)"
        )
    from huggingface_hub import snapshot_download

    if not download:
        try:
            return snapshot_download(name, local_files_only=True), True
        except Exception:  # noqa: BLE001 - not in the cache, in whatever way the hub client says it
            raise StartupError(
                f"{what}: no such folder, and not in the local Hugging Face cache as a repo id"
            ) from None
    print(f"{name!r} is not a local folder; downloading it from the Hugging Face Hub ...", flush=True)
    try:
        return snapshot_download(name), True
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, ...: one line either way
        raise StartupError(
            f"{what}: no such folder, and downloading it as a Hugging Face Hub repo id failed "
            f"({type(exc).__name__}: {one_line(exc)[:300]})"
        ) from None


@dataclass
class WeightFile:
    name: str  # relative to the checkpoint folder
    bytes: int
    tensors: int | None = None  # from the safetensors header; None for .bin files (not opened)
    parameters: int | None = None
    dtypes: list[str] = field(default_factory=list)


@dataclass
class CheckpointSummary:
    path: str
    family: str
    model_type: str | None
    architectures: list[str]
    checkpoint_dtype: str
    weights: list[WeightFile]
    config: dict = field(repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)


_ST_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


def safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (its first 8 + N bytes), CheckpointError naming the file if it
    is not one (truncated download, an LFS pointer, HTML saved under the name...)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise CheckpointError(
                f"{path}: not a safetensors file (header length {length} > file size {size})"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _weight_file(folder: Path, path: Path) -> WeightFile:
    entry = WeightFile(
        str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path), path.stat().st_size
    )
    if path.suffix == ".safetensors":
        tensors = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        entry.tensors = len(tensors)
        parameters = 0
        for value in tensors.values():
            count = 1
            for dim in value.get("shape", []) if isinstance(value, dict) else []:
                count *= int(dim)
            parameters += count
        entry.parameters = parameters
        entry.dtypes = sorted(
            {
                _ST_DTYPE_NAMES.get(str(v.get("dtype")), str(v.get("dtype")))
                for v in tensors.values()
                if isinstance(v, dict)
            }
        )
    return entry


def validate_checkpoint(path: str | Path, model_type: str | None = None) -> CheckpointSummary:
    """The start-up check of a checkpoint folder, before any weights load: config.json readable, the family
    detected (and agreeing with `model_type`), weight files present (safetensors headers readable),
    generation_config.json (when present) valid JSON. CheckpointError naming the file and key otherwise."""
    from mmserve.checkpoint import checkpoint_dtype, read_config, weight_files
    from mmserve.families import detect_family

    folder = Path(path)
    config = read_config(folder)
    family = detect_family(folder, model_type)
    weights = [_weight_file(folder, f) for f in weight_files(folder)]
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            json.loads(generation.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{generation}: not valid JSON ({exc})") from None
    return CheckpointSummary(
        path=str(folder),
        family=family,
        model_type=config.get("model_type"),
        architectures=list(config.get("architectures") or []),
        checkpoint_dtype=checkpoint_dtype(config),
        weights=weights,
        config=config,
    )


def served_dtype(checkpoint: str | Path, requested: str = "auto", device: str = "cpu") -> str:
    """What a service started with `requested` on `device` serves in (resolve_dtype, without its warning)."""
    from mmserve.checkpoint import resolve_dtype

    logger = logging.getLogger("mmserve.checkpoint")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return resolve_dtype(requested, checkpoint, device, "inspect")
    finally:
        logger.setLevel(level)


# ---- the details `inspect` reports ----------------------------------------------------------------


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


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_report(report: dict) -> str:
    served = report["dtype"]["served_on_cpu"]
    stored = report["dtype"]["checkpoint"]
    token = report["image_token"]
    generation = report["generation_config"]
    weights = report["weights"]
    parameters = sum(w["parameters"] or 0 for w in weights)
    lines = [
        f"checkpoint      {report['checkpoint']}",
        f"family          {report['family']}  (model_type {report['model_type']!r}, "
        f"architectures {', '.join(report['architectures']) or '-'})",
        f"dtype           {stored} in the checkpoint; served as {served} on CPU by default"
        + (" (float16 runs as bfloat16 on CPU)" if stored != served else "")
        + "; LLM_DTYPE / VISION_DTYPE override",
        f"image token id  {report['image_token_id'] if report['image_token_id'] is not None else '-'}"
        + (f"  {token}" if token else ""),
        f"tokens/image    {report['tokens_per_image_detail']}",
        f"context length  {report['context_length'] if report['context_length'] is not None else '-'}  "
        f"({report['context_length_source']})",
        f"chat template   {report['chat_template_content_format']}"
        + ("  (content format)" if report["chat_template_content_format"] in ("string", "openai") else ""),
        "generation      "
        + (
            ", ".join(f"{k}={v}" for k, v in sorted(generation.items()))
            if generation
            else "(no generation_config.json)"
        ),
        f"weights         {len(weights)} file{'s' if len(weights) != 1 else ''}, {_size(report['weights_total_bytes'])}"
        + (f", {parameters / 1e6:.1f} M parameters" if parameters else ""),
    ]
    for w in weights:
        detail = (
            f"{w['tensors']} tensors, {'/'.join(w['dtypes'])}" if w["tensors"] is not None else "not opened"
        )
        lines.append(f"  {w['name']}  {_size(w['bytes'])}  ({detail})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mmserve.cli import debug_requested, startup_errors

    argv, debug = debug_requested(argv)
    parser = argparse.ArgumentParser(
        prog="python -m mmserve inspect",
        description="What mmserve detects in a checkpoint folder (no weights are loaded). Exits 1 with the "
        "reason when mmserve cannot serve it.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (or a Hub repo id already in the local cache)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--model-type", default=os.environ.get("MODEL_TYPE") or None, help="family override [MODEL_TYPE]"
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors [MMSERVE_DEBUG=1]")
    args = parser.parse_args(argv)
    with startup_errors("mmserve inspect", debug, code=1):
        folder, _ = resolve_checkpoint_path(args.checkpoint, None, download=False)
        report = describe(folder, args.model_type)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
