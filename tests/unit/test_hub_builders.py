"""tests/checkpoints/hub.py: tiny checkpoints built from the real Hub files keep everything but sizes.

For every HUB_CONFIGS entry: config.json has the real file's keys at every nesting level, in its order,
and its non-size values (apart from the documented additions/removals); the weight names match the
real index where the reference has one; transformers' own classes load the native families with no
missing/unexpected keys and run a forward with an image; tokenizers give the real special-token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import hub_builder_fixtures
from tests.checkpoints.hub_specs import HUB_CONFIGS, reference_dir
from tests.checkpoints.hub_weights import collapse_layers
from tests.hub_builder_fixtures import NAMES, _compare, _get, _real

built = hub_builder_fixtures.built  # the shared module-scoped fixture


@pytest.mark.parametrize("name", NAMES)
def test_config_is_the_real_one_with_sizes_shrunk(built, name):
    spec = HUB_CONFIGS[name]
    real = _real(spec.config)
    for path in spec.removed:
        parent, _, last = path.rpartition(".")
        del (_get(real, parent) if parent else real)[last]
    ours = json.loads((built[name] / "config.json").read_text())
    problems: list[str] = []
    _compare(real, ours, "", dict(spec.sizes), dict(spec.added), problems)
    assert not problems, "\n".join(problems)
    # The values that dispatch and parsing depend on, spelled out.
    for key in ("model_type", "architectures", "vocab_size", "torch_dtype", "tie_word_embeddings"):
        if key in real:
            assert ours[key] == real[key], key


def test_documented_shape_changes():
    assert "_attn_implementation" in _real(HUB_CONFIGS["qwen2_vl_2b"].config)
    assert HUB_CONFIGS["qwen2_vl_2b"].removed == ("_attn_implementation",)
    assert HUB_CONFIGS["qwen2_vl_2b_awq_layout"].removed == ("quantization_config",)
    awq = _real(HUB_CONFIGS["qwen2_vl_2b_awq_layout"].config)
    assert list(awq["vision_config"]) == ["hidden_size", "in_chans", "model_type", "spatial_patch_size"]
    assert list(awq["rope_scaling"]) == ["mrope_section", "type"]
    # Only sparse configs get keys added, and only size keys.
    for name, spec in HUB_CONFIGS.items():
        for path in spec.added:
            assert path.rpartition(".")[2] in {
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "depth",
                "embed_dim",
                "num_heads",
            }, (name, path)


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_sizes_are_consistent(built, name):
    cfg = json.loads((built[name] / "config.json").read_text())
    family = HUB_CONFIGS[name].family
    if family in ("qwen2_vl", "qwen2_5_vl"):
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert sum(cfg["rope_scaling"]["mrope_section"]) == head_dim // 2
        assert "text_config" not in cfg  # flat stays flat
        v = cfg["vision_config"]
        if family == "qwen2_5_vl":
            assert v["out_hidden_size"] == cfg["hidden_size"]
            assert all(0 <= i < v["depth"] for i in v["fullatt_block_indexes"])
        else:
            assert v["hidden_size"] == cfg["hidden_size"]
        pre = json.loads((built[name] / "preprocessor_config.json").read_text())
        assert (pre["min_pixels"], pre["max_pixels"]) == (28 * 28 * 4, 28 * 28 * 16)
    if family == "qwen_vl":
        v = cfg["visual"]
        assert v["output_dim"] == cfg["hidden_size"] >= 128
        assert cfg["kv_channels"] * cfg["num_attention_heads"] == cfg["hidden_size"]


@pytest.mark.parametrize("name", NAMES)
def test_weight_names_and_files(built, name):
    import torch
    from safetensors import safe_open

    spec = HUB_CONFIGS[name]
    out = built[name]
    index_name = (
        "model.safetensors.index.json"
        if spec.weight_format == "safetensors"
        else "pytorch_model.bin.index.json"
    )
    weight_map = json.loads((out / index_name).read_text())["weight_map"]
    on_disk: dict[str, str] = {}
    dtypes = set()
    for shard in sorted(set(weight_map.values())):
        if shard.endswith(".safetensors"):
            with safe_open(str(out / shard), "pt") as f:
                for k in f.keys():
                    on_disk[k] = shard
                    dtypes.add(f.get_slice(k).get_dtype())
        else:
            for k, t in torch.load(out / shard, weights_only=True).items():
                on_disk[k] = shard
                dtypes.add(str(t.dtype))
    assert on_disk == weight_map
    cfg = json.loads((out / "config.json").read_text())
    want = {"bfloat16": {"BF16", "torch.bfloat16"}, "float16": {"F16", "torch.float16"}}[cfg["torch_dtype"]]
    assert dtypes <= want, dtypes
    if spec.index:
        real = _real(spec.index)["weight_map"]
        assert collapse_layers(weight_map) == collapse_layers(real)
        shard = next(iter(real.values()))
        assert shard.startswith("model-" if spec.weight_format == "safetensors" else "pytorch_model-")
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):  # the Hub repos' layout
        assert {k.split(".")[0] for k in weight_map} == (
            {"model", "visual"} | ({"lm_head"} - ({"lm_head"} if cfg["tie_word_embeddings"] else set()))
        )
        assert "model.embed_tokens.weight" in weight_map and "visual.patch_embed.proj.weight" in weight_map
    if spec.family == "llava_next":
        assert "image_newline" in weight_map
        assert collapse_layers(weight_map) - {"image_newline"} == collapse_layers(
            _real(HUB_CONFIGS["llava_1_5_hf"].index)["weight_map"]
        )


def test_copied_files_are_byte_identical(built):
    for name, spec in HUB_CONFIGS.items():
        for dst, src in spec.files.items():
            assert (built[name] / dst).read_bytes() == (reference_dir() / src).read_bytes(), (name, dst)


def test_float32_override(tmp_path):
    import torch

    from tests.checkpoints.hub import build_from_hub

    out = build_from_hub("llava_v1_5_original", tmp_path / "l", dtype="float32")
    weight_map = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    for shard in set(weight_map.values()):
        assert {t.dtype for t in torch.load(out / shard, weights_only=True).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"  # the real value


def test_seeded(tmp_path):
    from tests.checkpoints.hub import build_from_hub

    def shards(out: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))]

    a = shards(build_from_hub("llava_v1_6_mistral", tmp_path / "a", seed=0))
    assert a == shards(build_from_hub("llava_v1_6_mistral", tmp_path / "b", seed=0))
    assert a != shards(build_from_hub("llava_v1_6_mistral", tmp_path / "c", seed=1))
