"""Checkpoint inspection shared by all processes: family detection and selective weight reads."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from mmserve.errors import CheckpointError


def read_config(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json (is this a Hugging Face checkpoint folder?)")
    with open(path) as f:
        return json.load(f)


def _weight_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [checkpoint / shard for shard in shards]
    single = checkpoint / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights found")
    return files


def load_weights(checkpoint: str | Path, rename: Mapping[str, str], dtype: torch.dtype | None = None) -> dict:
    """Read only the tensors whose key starts with one of `rename`'s prefixes.

    Keys are returned with that prefix replaced by its value, e.g. {"language_model.model.": "model."}.
    Unused tensors are never read (safetensors is mmapped per key).
    """
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(checkpoint)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                for prefix, replacement in rename.items():
                    if key.startswith(prefix):
                        tensor = f.get_tensor(key)
                        state[replacement + key[len(prefix) :]] = tensor.to(dtype) if dtype else tensor
                        break
    return state


def load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load `state` into `module`, failing loudly on any missing or unexpected key.

    A module left partly at its random initialisation serves garbage without an error; a missing
    key must stop the service at startup instead.
    """
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: checkpoint does not match the model "
            f"(missing {len(missing)}: {missing[:8]}; unexpected {len(unexpected)}: {unexpected[:8]})"
        )
    module.load_state_dict(state, strict=True)


def first_prefix_present(checkpoint: str | Path, candidates: list[str]) -> str:
    """The first of `candidates` that prefixes some weight key (checkpoints differ in layout)."""
    keys: list[str] = []
    for path in _weight_files(Path(checkpoint)):
        with safe_open(str(path), framework="pt") as f:
            keys.extend(f.keys())
    for prefix in candidates:
        if any(key.startswith(prefix) for key in keys):
            return prefix
    raise CheckpointError(f"{checkpoint}: no weight key starts with any of {candidates}")


# dtypes a model may be served in.
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def check_model_dtype(name: str) -> None:
    if name not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(MODEL_DTYPES)}; got {name!r}")


def parse_dtype(name: str) -> torch.dtype:
    check_model_dtype(name)
    return getattr(torch, name)
