"""Weights of the Hub builders: seeded random models under the Hub repos' key names, sharded as they shard."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.checkpoints.hub_specs import HubSpec, load_json, write_json

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
    write_json(
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
    real = collapse_layers(load_json(spec.index)["weight_map"])
    ours = collapse_layers(keys)
    if real != ours:
        raise AssertionError(
            f"{spec.name}: weight names differ from {spec.index}: "
            f"missing {sorted(real - ours)}, extra {sorted(ours - real)}"
        )
