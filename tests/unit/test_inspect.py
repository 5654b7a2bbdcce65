"""mmserve.checkpoint_check, checkpoint_facts and inspect: the Hub-id rule, the shared start-up validation, and what `inspect` reports per family
(from hand-written config.json files and header-only safetensors files: nothing is loaded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mmserve.checkpoint_check import (
    CheckpointSummary,
    is_hub_id,
    resolve_checkpoint_path,
    validate_checkpoint,
)
from mmserve.checkpoint_facts import context_length, describe, tokens_per_image
from mmserve.cli import StartupError
from mmserve.errors import CheckpointError
from mmserve.inspect import format_report

LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 32000,
    "torch_dtype": "float16",
    "vision_feature_select_strategy": "default",
    "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
    "text_config": {"model_type": "llama", "max_position_embeddings": 4096},
}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file (zero-filled data) with `tensors`: name -> (dtype, shape)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def checkpoint(folder: Path, config: dict, weights: bool = True, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        write_safetensors(folder / "model.safetensors", {"a.weight": ("F16", [4, 8]), "b.bias": ("F16", [8])})
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def summary(tmp_path: Path, config: dict) -> CheckpointSummary:
    return validate_checkpoint(checkpoint(tmp_path / "ckpt", config))


@pytest.mark.parametrize(
    "name", ["gpt2", "llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2-VL-2B-Instruct", "org_1/model.v2", "a"]
)
def test_hub_ids(name):
    assert is_hub_id(name)


@pytest.mark.parametrize(
    "name",
    [
        "/no/such/path",
        "./model",
        "../model",
        "~/model",
        "a/b/c",
        ".hidden",
        "org/.model",
        "-model",
        "model-",
        "org/mod--el",
        "org/mo..del",
        "C:\\models\\llava",
        "org/name with space",
        "",
        "x" * 97,
    ],
)
def test_paths_are_never_hub_ids(name):
    assert not is_hub_id(name)


def test_resolve_checkpoint_path_names_the_variable_and_what_is_missing(tmp_path):
    with pytest.raises(StartupError, match=r"^MODEL=/no/such/path: no such folder"):
        resolve_checkpoint_path("/no/such/path", "MODEL")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartupError, match="empty: the folder has no config.json"):
        resolve_checkpoint_path(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="is a file"):
        resolve_checkpoint_path(str(tmp_path / "file"))
    folder = checkpoint(tmp_path / "ok", LLAVA)
    assert resolve_checkpoint_path(str(folder)) == (str(folder.resolve()), False)


def test_resolve_checkpoint_path_looks_up_hub_ids_only_in_the_cache_when_told(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StartupError, match="not in the local Hugging Face cache"):
        resolve_checkpoint_path("someorg/somemodel", None, download=False)


def test_validate_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        validate_checkpoint(bad)
    with pytest.raises(CheckpointError, match=r"model_type='bert'"):
        validate_checkpoint(
            checkpoint(tmp_path / "bert", {"model_type": "bert", "architectures": ["BertModel"]})
        )
    with pytest.raises(CheckpointError, match="no weights found"):
        validate_checkpoint(checkpoint(tmp_path / "noweights", LLAVA, weights=False))
    truncated = checkpoint(tmp_path / "truncated", LLAVA, weights=False)
    (truncated / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a safetensors file"):
        validate_checkpoint(truncated)
    gen = checkpoint(tmp_path / "gen", LLAVA, generation_config__json="{oops")
    with pytest.raises(CheckpointError, match=r"generation_config.json: not valid JSON"):
        validate_checkpoint(gen)
    with pytest.raises(CheckpointError, match="MODEL_TYPE='qwen2_vl' but"):
        validate_checkpoint(checkpoint(tmp_path / "ok", LLAVA), "qwen2_vl")


def test_validate_reads_headers_only(tmp_path):
    s = summary(tmp_path, LLAVA)
    assert (s.family, s.checkpoint_dtype) == ("llava", "float16")
    [w] = s.weights
    assert (w.name, w.tensors, w.parameters, w.dtypes) == ("model.safetensors", 2, 40, ["float16"])


def test_tokens_per_image_llava_hf(tmp_path):
    assert tokens_per_image(summary(tmp_path / "a", LLAVA))[0] == 576
    full = {**LLAVA, "vision_feature_select_strategy": "full"}
    assert tokens_per_image(summary(tmp_path / "b", full))[0] == 577
    siglip = {
        **LLAVA,
        "vision_config": {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14},
    }
    assert tokens_per_image(summary(tmp_path / "c", siglip))[0] == 729


def test_tokens_per_image_llava_next_is_dynamic(tmp_path):
    config = {
        **LLAVA,
        "model_type": "llava_next",
        "architectures": ["LlavaNextForConditionalGeneration"],
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    }
    count, text = tokens_per_image(summary(tmp_path, config))
    assert count is None
    assert text.startswith("dynamic (anyres)") and "grid pinpoints" in text
    assert text.endswith("up to 2928")  # LLaVA-1.6's well-known maximum


def test_tokens_per_image_original_llava_from_the_tower_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the tower is not on disk
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "max_position_embeddings": 4096,
    }
    count, text = tokens_per_image(summary(tmp_path / "a", config))
    assert count == 576 and "not on disk" in text
    count, _ = tokens_per_image(summary(tmp_path / "b", {**config, "mm_vision_select_feature": "cls_patch"}))
    assert count == 577
    tower = tmp_path / "b" / "ckpt" / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"vision_config": {"image_size": 224, "patch_size": 14}}))
    count, text = tokens_per_image(summary(tmp_path / "c", {**config, "mm_vision_tower": str(tower)}))
    assert count == 256 and "CLIP tower's config" in text


QWEN_VL = {
    "architectures": ["QWenLMHeadModel"],
    "model_type": "qwen",
    "visual": {"n_queries": 256, "image_size": 448},
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "bf16": True,
}


def test_qwen_vl_fixed_tokens_and_seq_length_cap(tmp_path):
    s = summary(tmp_path, QWEN_VL)
    assert tokens_per_image(s)[0] == 256
    length, source = context_length(s)
    assert length == 2048 and "seq_length" in source
    assert s.checkpoint_dtype == "bfloat16"


def test_qwen2_vl_dynamic_tokens_from_the_preprocessor_config(tmp_path):
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "image_token_id": 151655,
        "max_position_embeddings": 32768,
    }
    folder = checkpoint(
        tmp_path / "q",
        config,
        preprocessor_config__json=json.dumps(
            {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}
        ),
    )
    count, text = tokens_per_image(validate_checkpoint(folder))
    assert count is None
    assert "min_pixels 3136..max_pixels 12845056 -> 4..16384 tokens" in text
    assert context_length(validate_checkpoint(folder))[0] == 32768


def test_context_length_never_the_tokenizers_sentinel(tmp_path):
    folder = checkpoint(
        tmp_path / "c",
        LLAVA,
        tokenizer_config__json=json.dumps({"model_max_length": 1000000000000000019884624838656}),
    )
    assert context_length(validate_checkpoint(folder)) == (4096, "text_config.max_position_embeddings")
    no_length = {**LLAVA, "text_config": {"model_type": "llama"}}
    length, source = context_length(summary(tmp_path / "d", no_length))
    assert length == 2048 and "default" in source


def test_describe_and_report(tmp_path):
    folder = checkpoint(
        tmp_path / "c",
        LLAVA,
        chat_template__jinja="{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}",
        generation_config__json=json.dumps({"temperature": 0.2, "do_sample": True}),
    )
    report = describe(folder)
    assert report["family"] == "llava"
    assert report["dtype"] == {"checkpoint": "float16", "served_on_cpu": "bfloat16"}
    assert report["image_token_id"] == 32000
    assert report["tokens_per_image"] == 576
    assert report["context_length"] == 4096
    assert report["chat_template_content_format"] in (
        "openai",
        "unknown (gateway.chat_template is not available)",
    )
    assert report["generation_config"]["temperature"] == 0.2
    assert report["weights"][0]["name"] == "model.safetensors"
    json.dumps(report)  # --json
    text = format_report(report)
    assert "family          llava" in text and "576" in text and "bfloat16" in text
