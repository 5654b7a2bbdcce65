"""Checkpoint inspection shared by all processes: config, dtype, and selective weight reads from every
weight format the Hub repos use (safetensors single or sharded, `pytorch_model*.bin` single or sharded)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mmserve.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# torch (and safetensors' torch side) are imported where tensors are read: the launcher and
# `inspect` validate a checkpoint through this module in a fraction of a second without them.

log = logging.getLogger(__name__)

# Buffers that some checkpoints saved although the model recomputes them (transformers < 4.31 wrote
# Llama's RoPE frequencies into the shards): skipped by name; any other unexpected key is an error.
NON_PERSISTENT_SUFFIXES = (".rotary_emb.inv_freq",)


def read_config(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json (is this a Hugging Face checkpoint folder?)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a weight index (no weight_map: {exc!r})") from None
    shards = [index.parent / shard for shard in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shards that are not in the folder: {missing[:4]}")
    return shards


def weight_files(checkpoint: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors preferred (as transformers does)."""
    folder = Path(checkpoint)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return _index_shards(folder / index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(
        f"{checkpoint}: no weights found (looked for model.safetensors[.index.json], *.safetensors, "
        "pytorch_model[.bin.index.json] and pytorch_model*.bin)"
    )


@contextmanager
def _open_shard(path: Path) -> Iterator[_BinShard]:
    """A shard as a key -> tensor mapping that reads lazily: safetensors per key, `.bin` through an
    mmapped, weights-only torch.load (no code runs, and untouched tensors are never paged in)."""
    import torch
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            yield f
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint file
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    yield _BinShard(state)


class _BinShard:
    """torch.load's dict behind safe_open's two methods (the type both kinds of shard are read as)."""

    def __init__(self, state: dict):
        self.state = state

    def keys(self):
        return self.state.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


def weight_keys(checkpoint: str | Path) -> list[str]:
    keys: list[str] = []
    for path in weight_files(checkpoint):
        with _open_shard(path) as shard:
            keys.extend(shard.keys())
    return keys


def load_weights(checkpoint: str | Path, rename: Mapping[str, str], dtype: torch.dtype | None = None) -> dict:
    """Read only the tensors whose key starts with one of `rename`'s prefixes.

    Keys are returned with that prefix replaced by its value, e.g. {"language_model.model.": "model."}.
    Unused tensors are never read; saved copies of non-persistent buffers (NON_PERSISTENT_SUFFIXES)
    are skipped. Each tensor is cast to `dtype` as it is read, so a shard set is never held twice.
    """
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(checkpoint):
        with _open_shard(path) as shard:
            for key in shard.keys():
                if key.endswith(NON_PERSISTENT_SUFFIXES):
                    continue
                for prefix, replacement in rename.items():
                    if key.startswith(prefix):
                        tensor = shard.get_tensor(key)
                        state[replacement + key[len(prefix) :]] = tensor.to(dtype) if dtype else tensor
                        break
    return state


def load_strict(module: torch.nn.Module, state: dict, what: str, assign: bool = False) -> None:
    """Load `state` into `module`, failing loudly on any missing or unexpected key.

    A module left partly at its random initialisation serves garbage without an error; a missing
    key must stop the service at startup instead. `assign` makes the module's parameters the state's
    tensors themselves (a module built on the meta device has no storage to copy into).
    """
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: checkpoint does not match the model "
            f"(missing {len(missing)}: {missing[:8]}; unexpected {len(unexpected)}: {unexpected[:8]})"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
        for k, p in module.state_dict().items()
        if tuple(state[k].shape) != tuple(p.shape)
    ]
    if mismatched:
        raise CheckpointError(f"{what}: tensor shapes differ from config.json's: {mismatched[:4]}")
    module.load_state_dict(state, strict=True, assign=assign)


def first_prefix_present(checkpoint: str | Path, candidates: list[str]) -> str:
    """The first of `candidates` that prefixes some weight key (checkpoints differ in layout)."""
    keys = weight_keys(checkpoint)
    for prefix in candidates:
        if any(key.startswith(prefix) for key in keys):
            return prefix
    raise CheckpointError(f"{checkpoint}: no weight key starts with any of {candidates}")


# dtypes a model may be served in; "auto" = the checkpoint's own (config.json `torch_dtype` / `dtype`).
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_model_dtype(name: str) -> None:
    if name not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(MODEL_DTYPES)}; got {name!r}")


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint was saved in, as config.json says (float32 when it says nothing).

    `torch_dtype` (transformers 4) or `dtype` (transformers 5) at the top level, else in `text_config`;
    Qwen-VL v1's legacy `bf16` / `fp16` / `fp32` flags win when one is set (its remote code reads them).
    """
    for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        if config.get(flag) is True:
            return name
    text = config.get("text_config")
    for source in (config, text if isinstance(text, dict) else {}):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in MODEL_DTYPES[1:]:
                return value.removeprefix("torch.")
    return "float32"


def resolve_dtype(requested: str, checkpoint: str | Path, device: str, what: str) -> str:
    """The dtype to serve in: `requested`, or for "auto" the checkpoint's own, except that float16 on a
    CPU becomes bfloat16 (CPU float16 kernels are slow or missing; bfloat16 has float32's range)."""
    check_model_dtype(requested)
    if requested != "auto":
        return requested
    name = checkpoint_dtype(read_config(checkpoint))
    if name == "float16" and device.split(":")[0] == "cpu":
        log.warning(
            "%s: the checkpoint is float16; serving bfloat16 on CPU (set the dtype to override)", what
        )
        return "bfloat16"
    return name


def parse_dtype(name: str) -> torch.dtype:
    check_model_dtype(name)
    if name == "auto":
        raise ValueError("resolve 'auto' with resolve_dtype() first")
    import torch

    return getattr(torch, name)


def generation_config(checkpoint: str | Path) -> dict:
    """generation_config.json's settings (eos ids, default sampling values), {} when there is none.

    Read through transformers' GenerationConfig, so its validation and defaults apply; only the keys
    the file sets are returned (`to_diff_dict`), since those are what it asks of a server."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(checkpoint))
    except Exception as exc:  # noqa: BLE001 - any parse failure names the file
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None
    return config.to_diff_dict()
