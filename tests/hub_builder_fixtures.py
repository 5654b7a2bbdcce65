"""Shared helpers for the tests/checkpoints/hub.py tests: the built checkpoints, tokenizer cache, config walk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints.hub_specs import HUB_CONFIGS, reference_dir

NAMES = sorted(HUB_CONFIGS)
NATIVE = [n for n in NAMES if HUB_CONFIGS[n].hf_class]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    from tests.checkpoints.hub import build_from_hub

    root = tmp_path_factory.mktemp("hub")
    return {name: build_from_hub(name, root / name, seed=0) for name in NAMES}


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(out: Path, family: str):
    """AutoTokenizer (or the gateway's Qwen-VL loader) for a built folder; folders with byte-identical
    tokenizer files share one load (a Qwen2 tokenizer load takes seconds)."""
    import hashlib

    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "qwen.tiktoken",
        "special_tokens_map.json",
        "added_tokens.json",
    )
    digest = hashlib.sha256(family.encode())
    for n in names:
        if (out / n).is_file():
            digest.update(n.encode() + (out / n).read_bytes())
    key = digest.hexdigest()
    if key not in _TOKENIZERS:
        if family == "qwen_vl":
            from mmserve.qwen_tokenizer import load_qwen_tokenizer

            _TOKENIZERS[key] = load_qwen_tokenizer(out)
        else:
            from transformers import AutoTokenizer

            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(out)
    return _TOKENIZERS[key]


def _real(rel: str):
    return json.loads((reference_dir() / rel).read_text(encoding="utf-8"))


def _get(d, path: str):
    for p in path.split("."):
        d = d[p]
    return d


def _compare(real, ours, path, sizes, added, problems):
    """Walk real vs ours: same keys (in order) at every level bar additions; same leaves bar sizes."""
    if path in sizes:
        if ours != sizes[path]:
            problems.append(f"{path}: {ours!r} != shrunk {sizes[path]!r}")
        return
    if isinstance(real, dict):
        if not isinstance(ours, dict):
            problems.append(f"{path}: not an object any more")
            return
        expect_added = {p.rpartition(".")[2] for p in added if p.rpartition(".")[0] == path}
        ours_keys = [k for k in ours if k not in expect_added]
        if ours_keys != list(real):
            problems.append(f"{path or '<top>'}: keys {ours_keys} != real {list(real)}")
        for k in expect_added:
            full = f"{path}.{k}" if path else k
            if ours.get(k) != added[full]:
                problems.append(f"{full}: added value {ours.get(k)!r} != {added[full]!r}")
        for k in real:
            if k in ours:
                _compare(real[k], ours[k], f"{path}.{k}" if path else k, sizes, added, problems)
        return
    if type(real) is not type(ours) or real != ours:
        problems.append(f"{path}: {ours!r} != real {real!r}")


def _image(w: int, h: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(w * 1000 + h)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
