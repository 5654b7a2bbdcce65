"""tests/checkpoints/hub.py: the built tiny checkpoints load and run in transformers and tokenize like the real ones."""

from __future__ import annotations

import json

import pytest

from tests import hub_builder_fixtures
from tests.checkpoints.hub_specs import HUB_CONFIGS, reference_dir
from tests.hub_builder_fixtures import NAMES, NATIVE, _image, _real, _tokenizer

built = hub_builder_fixtures.built  # the shared module-scoped fixture


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


@pytest.mark.parametrize("name", NAMES)
def test_structured_output_masks_over_the_real_tokenizer(built, name):
    """Every family's real tokenizer (built from the Hub files) drives a structured-output matcher: the
    tokenizer's own encoding of a valid answer is allowed token by token and completes the schema, and
    the model's padded vocabulary rows past the tokenizer (Qwen2-VL: 152064 logits, 151665 tokens) are
    never allowed."""
    from mmserve.structured import MatcherFactory, allowed_tokens, json_schema

    spec = HUB_CONFIGS[name]
    out = built[name]
    cfg = json.loads((out / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
    tok = _tokenizer(out, spec.family)
    factory = MatcherFactory(spec.family, str(out), vocab, [])
    schema = {
        "type": "object",
        "properties": {"caption": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["caption", "count"],
        "additionalProperties": False,
    }
    matcher = factory.matcher(json_schema(schema))
    answer = '{"caption":"a cat on a mat, 你好","count":3}'
    ids = tok(answer, add_special_tokens=False).input_ids
    while not tok.decode(ids[:1]).strip():  # Llama's SentencePiece starts a text with a lone "▁" piece
        ids = ids[1:]
    assert tok.decode(ids) == answer
    for token in ids:
        allowed = allowed_tokens([matcher], vocab)[0]
        assert allowed.shape == (vocab,) and bool(allowed[token]), (name, tok.decode([token]))
        assert not bool(allowed[len(tok) :].any()), f"{name}: an id past the tokenizer is allowed"
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_stopped(), f"{name}: the schema is not complete after {answer!r}"
