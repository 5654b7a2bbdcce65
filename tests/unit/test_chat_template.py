"""Chat templates: where a template comes from, string-content flattening per family,
chat_template_kwargs, and the 400s of template problems (content-format detection: test_template_format)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pydantic
import pytest
from fastapi.testclient import TestClient

from gateway.chat_template import (
    RESERVED_TEMPLATE_KWARGS,
    ChatTemplate,
    flatten_content,
    load_chat_template,
)
from gateway.config import GatewayConfig, MediaConfig
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.prompt_llava import LlavaPrompt
from gateway.prompt_qwen2_vl import Qwen2VLPrompt
from gateway.protocol import ChatCompletionRequest
from gateway.serving import ServingCore
from mmserve.errors import CheckpointError, InvalidInputError
from tests.unit.test_api import ScriptedLLM
from tests.unit.test_template_format import REFERENCE, STRING_LLAVA
from tools.checkpoints import LLAVA_CHAT_TEMPLATE, build_tokenizer

# ---- loading -------------------------------------------------------------------------------------


def tokenizer_with(template=None):
    return SimpleNamespace(chat_template=template)


def test_loading_order(tmp_path):
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_chat_template(str(tmp_path), tokenizer_with()) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert load_chat_template(str(tmp_path), tokenizer_with()) == "from jinja"
    assert load_chat_template(str(tmp_path), tokenizer_with("from tokenizer")) == "from tokenizer"
    assert (
        load_chat_template(str(tmp_path), tokenizer_with("from tokenizer"), "{{ 'inline' }}")
        == "{{ 'inline' }}"
    )


def test_no_template_anywhere(tmp_path):
    assert load_chat_template(str(tmp_path), tokenizer_with()) is None


def test_named_templates_pick_the_default(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    assert load_chat_template(str(tmp_path), tokenizer_with(named)) == "plain"


def test_override_from_a_file_or_inline(tmp_path):
    (tmp_path / "mine.jinja").write_text(STRING_LLAVA)
    (tmp_path / "mine.json").write_text(json.dumps({"chat_template": LLAVA_CHAT_TEMPLATE}))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "chat_template.jinja").write_text("checkpoint's")
    tok = tokenizer_with("tokenizer's")
    assert load_chat_template(str(checkpoint), tok, str(tmp_path / "mine.jinja")) == STRING_LLAVA
    assert load_chat_template(str(checkpoint), tok, str(tmp_path / "mine.json")) == LLAVA_CHAT_TEMPLATE
    assert load_chat_template(str(checkpoint), tok, STRING_LLAVA) == STRING_LLAVA
    assert load_chat_template(str(checkpoint), tok, None) == "tokenizer's"


def test_a_missing_override_file_is_a_startup_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing file nor Jinja"):
        load_chat_template(str(tmp_path), tokenizer_with(), str(tmp_path / "typo.jinja"))


def test_an_override_that_does_not_parse_is_a_startup_error(tmp_path):
    with pytest.raises(CheckpointError, match="chat template override: line 1"):
        load_chat_template(str(tmp_path), tokenizer_with(), "{% for m in messages %}{{ m }}")


def test_the_flag_and_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAT_TEMPLATE", raising=False)
    assert GatewayConfig.from_args(["--checkpoint", str(tmp_path)]).chat_template is None
    config = GatewayConfig.from_args(["--checkpoint", str(tmp_path), "--chat-template", "t.jinja"])
    assert config.chat_template == "t.jinja"
    monkeypatch.setenv("CHAT_TEMPLATE", STRING_LLAVA)
    assert GatewayConfig.from_args(["--checkpoint", str(tmp_path)]).chat_template == STRING_LLAVA


# ---- flattening and rendering --------------------------------------------------------------------

PARTS = [
    {"type": "text", "text": "Compare"},
    {"type": "image"},
    {"type": "text", "text": "with"},
    {"type": "image"},
]


def test_llava_flattening_puts_images_first():
    text = flatten_content(
        PARTS, LlavaPrompt.chat_image_text, LlavaPrompt.chat_images_first, LlavaPrompt.chat_text_separator
    )
    assert text == "<image>\n<image>\nCompare\nwith"


def test_qwen2_vl_flattening_keeps_each_image_in_place():
    text = flatten_content(
        PARTS,
        Qwen2VLPrompt.chat_image_text,
        Qwen2VLPrompt.chat_images_first,
        Qwen2VLPrompt.chat_text_separator,
    )
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == f"Compare{block}with{block}"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_a_string_template_renders_like_the_parts_template(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    string = ChatTemplate(STRING_LLAVA, "<image>\n", True, "\n")
    parts = ChatTemplate(LLAVA_CHAT_TEMPLATE, "<image>\n", True, "\n")
    assert string.content_format == "string" and parts.content_format == "openai"
    assert string.render(tokenizer, messages) == parts.render(tokenizer, messages)
    assert string.render(tokenizer, messages) == "USER: <image>\nWhat is this? ASSISTANT:"


def test_qwen2_vl_add_vision_id_reaches_the_template(tokenizer):
    template = json.loads((REFERENCE / "Qwen__Qwen2-VL-2B-Instruct/chat_template.json").read_text())
    qwen = ChatTemplate(template["chat_template"], Qwen2VLPrompt.chat_image_text, False, "")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    plain = qwen.render(tokenizer, messages)
    numbered = qwen.render(tokenizer, messages, {"add_vision_id": True})
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert f"user\n{block}Describe.<|im_end|>" in plain
    assert f"user\nPicture 1: {block}Describe.<|im_end|>" in numbered


@pytest.mark.parametrize("key", sorted(RESERVED_TEMPLATE_KWARGS))
def test_reserved_kwargs_are_refused_at_render(tokenizer, key):
    with pytest.raises(InvalidInputError, match=key):
        ChatTemplate(STRING_LLAVA, "<image>\n", True, "\n").render(
            tokenizer, [{"role": "user", "content": "hi"}], {key: True}
        )


@pytest.mark.parametrize(
    "template,match",
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "TypeError"),
        ("{{ nothing.here }}", "UndefinedError"),
    ],
)
def test_a_template_that_fails_is_invalid_input(tokenizer, template, match):
    with pytest.raises(InvalidInputError, match=match):
        ChatTemplate(template, "<image>\n", True, "\n").render(tokenizer, [{"role": "user", "content": "hi"}])


# ---- chat_template_kwargs at the edge ------------------------------------------------------------


@pytest.mark.parametrize("key", ["messages", "tokenize", "add_generation_prompt", "chat_template"])
def test_kwargs_colliding_with_ours_are_refused(key):
    with pytest.raises(pydantic.ValidationError, match=key):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], chat_template_kwargs={key: 1})


def test_free_kwargs_are_kept():
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], chat_template_kwargs={"add_vision_id": True}
    )
    assert body.chat_template_kwargs == {"add_vision_id": True}


def serve(checkpoint, template):
    prompt = LlavaPrompt(str(checkpoint), str(checkpoint), chat_template=template)
    llm = ScriptedLLM(prompt.tokenizer, prompt)
    llm.answer = "ok"
    core = ServingCore(prompt, None, llm, MediaFetcher(MediaConfig()), max_images_per_request=4)
    return TestClient(create_app(core, "tiny")), llm, prompt


def chat(http, content="Hello there", **body):
    return http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 4, **body},
    )


def test_kwargs_reach_the_template_over_http(tiny_checkpoint):
    template = "{{ greeting }} {% for m in messages %}{{ m['content'] }}{% endfor %} ASSISTANT:"
    http, llm, prompt = serve(tiny_checkpoint, template)
    with http:
        response = chat(http, chat_template_kwargs={"greeting": "Hi!"})
        assert response.status_code == 200, response.text
        assert prompt.tokenizer.decode(llm.requests[-1].token_ids, skip_special_tokens=True) == (
            "Hi! Hello there ASSISTANT:"
        )


def test_a_colliding_kwarg_is_a_400_naming_the_field(tiny_checkpoint):
    http, _, _ = serve(tiny_checkpoint, STRING_LLAVA)
    with http:
        response = chat(http, chat_template_kwargs={"add_generation_prompt": False})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "chat_template_kwargs" and error["type"] == "invalid_request_error"
    assert "add_generation_prompt" in error["message"]


def test_a_string_template_serves_text_chats(tiny_checkpoint):
    http, llm, prompt = serve(tiny_checkpoint, STRING_LLAVA)
    with http:
        response = chat(http, [{"type": "text", "text": "Hello there"}])
    assert response.status_code == 200, response.text
    assert prompt.tokenizer.decode(llm.requests[-1].token_ids, skip_special_tokens=True) == (
        "USER: Hello there ASSISTANT:"
    )


def test_a_template_that_raises_is_a_400(tiny_checkpoint):
    http, _, _ = serve(tiny_checkpoint, "{{ raise_exception('only one user turn, please') }}")
    with http:
        response = chat(http)
    assert response.status_code == 400
    assert "only one user turn, please" in response.json()["error"]["message"]


def test_typed_special_tokens_are_still_refused_with_a_string_template(tiny_checkpoint):
    http, llm, _ = serve(tiny_checkpoint, STRING_LLAVA)
    with http:
        response = chat(http, "look: <image>")
    assert response.status_code == 400 and "<image>" in response.json()["error"]["message"]
    assert not llm.requests


def test_no_template_is_a_400_pointing_to_the_ways_out(tiny_checkpoint, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "chat_template.jinja").unlink()
    http, _, prompt = serve(bare, None)
    assert prompt.chat_template is None
    with http:
        response = chat(http)
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "no chat template" in message and "CHAT_TEMPLATE" in message and "/v1/completions" in message
        done = http.post("/v1/completions", json={"prompt": "USER: hi ASSISTANT:", "max_tokens": 4})
        assert done.status_code == 200, done.text


def test_special_tokens_in_kwargs_are_refused(tiny_checkpoint):
    template = "{{ bos_token }}{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    http, llm, _ = serve(tiny_checkpoint, template)
    with http:
        response = chat(http, chat_template_kwargs={"bos_token": "<image>"})
        nested = chat(http, chat_template_kwargs={"extra": {"notes": ["fine", "</s>"]}})
    assert response.status_code == nested.status_code == 400
    assert "<image>" in response.json()["error"]["message"] and "</s>" in nested.json()["error"]["message"]
    assert not llm.requests
