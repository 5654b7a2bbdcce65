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

The reference tree is tests/hub_configs/ (a copy of the team's shared/reference/configs). The LLaVA
families' builders are in hub_llava.py, the Qwen families' here.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.checkpoints.hub_llava import build_llava_hf, build_llava_next, build_llava_original
from tests.checkpoints.hub_specs import (
    HUB_CONFIGS,
    REFERENCE_DIR,
    HubSpec,
    load_json,
    write_json,
)
from tests.checkpoints.hub_tokenizers import qwen2_tokenizer_json
from tests.checkpoints.hub_weights import (
    _check_against_index,
    _native_state,
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
    "llava": build_llava_hf,
    "llava_next": build_llava_next,
    "llava_original": build_llava_original,
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
