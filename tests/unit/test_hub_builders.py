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

from tests.checkpoints.hub_specs import HUB_CONFIGS, reference_dir
from tests.checkpoints.hub_weights import collapse_layers

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
            from gateway.qwen_tokenizer import load_qwen_tokenizer

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


def _image(w: int, h: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(w * 1000 + h)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", NATIVE)
def test_transformers_loads_and_runs(built, name):
    import torch
    import transformers

    spec = HUB_CONFIGS[name]
    out = built[name]
    cls = getattr(transformers, spec.hf_class)
    model, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    cfg = json.loads((out / "config.json").read_text())
    text_cfg = model.config.get_text_config()
    assert text_cfg.hidden_size == cfg.get("hidden_size", cfg.get("text_config", {}).get("hidden_size"))
    assert model.get_input_embeddings().weight.shape[0] == cfg["vocab_size"]
    model.eval()

    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import AutoImageProcessor

        tok = _tokenizer(out, spec.family)
        image_proc = AutoImageProcessor.from_pretrained(out)
        pix = image_proc(images=[_image(100, 70)], return_tensors="pt")
        n = int(pix["image_grid_thw"].prod()) // 4
        assert 4 <= n <= 16
        text = tok.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
        ids = tok(text, return_tensors="pt").input_ids
        assert int((ids == cfg["image_token_id"]).sum()) == n
        mm = (ids == cfg["image_token_id"]).long()
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                pixel_values=pix["pixel_values"],
                image_grid_thw=pix["image_grid_thw"],
                mm_token_type_ids=mm,
            ).logits
    else:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(out)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
        ]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        want = (
            "USER: <image>\nWhat is this? ASSISTANT:"
            if spec.family == "llava"
            else "[INST] <image>\nWhat is this? [/INST]"
        )
        assert prompt == want
        inputs = proc(images=[_image(90, 60)], text=[prompt], return_tensors="pt")
        assert inputs["input_ids"][0, 0] == 1  # BOS, as Llama
        with torch.no_grad():
            logits = model(**inputs).logits
    assert logits.shape[-1] == cfg["vocab_size"]
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_special_ids(built, name):
    spec = HUB_CONFIGS[name]
    out = built[name]
    tok = _tokenizer(out, spec.family)
    for token, token_id in spec.special_tokens.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
        assert token_id in tok(f"hello {token} world", add_special_tokens=False).input_ids, token
    text = "What is in the picture? 你好 😀 12345"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    if spec.family in ("llava", "llava_next", "llava_original"):
        assert tok("hi").input_ids[0] == 1  # Llama adds BOS
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        real = _real(spec.files["tokenizer_config.json"])
        assert tok.bos_token is None and tok.eos_token == "<|im_end|>"
        assert tok.model_max_length == real["model_max_length"]
        assert len(tok) == 151643 + len(real["added_tokens_decoder"])
        rendered = tok.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture please."}],
                }
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert rendered == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>Describe the picture please.<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    if spec.family == "llava":
        assert (
            tok.model_max_length
            == _real("llava-hf__llava-1.5-7b-hf/tokenizer_config.json")["model_max_length"]
        )


def test_llava_original_clip_tower_resolves_locally(built):
    import torch
    from transformers import AutoImageProcessor, CLIPVisionModel

    out = built["llava_v1_5_original"]
    cfg = json.loads((out / "config.json").read_text())
    tower = out / cfg["mm_vision_tower"]
    assert (tower / "config.json").is_file() and (tower / "model.safetensors").is_file()
    model, info = CLIPVisionModel.from_pretrained(tower, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    assert model.config.hidden_size == cfg["mm_hidden_size"]
    pix = AutoImageProcessor.from_pretrained(tower)(images=[_image(80, 50)], return_tensors="pt")[
        "pixel_values"
    ]
    assert pix.shape[-2:] == (56, 56)
    with torch.no_grad():
        hidden = model(pixel_values=pix, output_hidden_states=True).hidden_states[
            cfg["mm_vision_select_layer"]
        ]
    assert hidden.shape == (1, 1 + (56 // 14) ** 2, cfg["mm_hidden_size"])
    assert (out / "tokenizer.model").is_file()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (
            reference_dir() / "liuhaotian__llava-v1.5-7b" / name
        ).read_bytes()


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
