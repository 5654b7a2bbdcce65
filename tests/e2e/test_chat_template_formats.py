"""Chat templates of both content formats through the three-process stack: a llava checkpoint whose
template renders `message['content']` as a plain string answers image and text chats, token-identical
to transformers' greedy `generate` on the string that template renders (with `<image>` where the gateway
puts it); a --chat-template override serves a checkpoint that has none; template problems are 400s."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from tests.helpers import greedy_chat, openai_client, serving
from tests.reference import LlavaReference
from tools.checkpoints import build_llava_checkpoint

MAX_TOKENS = 16

# An original-llava-1.5 style community template: content is a string; roles must alternate.
STRING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first and message['role'] == loop.previtem['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
OVERRIDE_TEMPLATE = "{{ 'A chat with a tiny model. ' }}" + STRING_TEMPLATE


@pytest.fixture(scope="module")
def string_checkpoint(tmp_path_factory):
    """The demo llava checkpoint with its chat_template.jinja (what our loader reads, the tokenizer having
    none) replaced by a string-content template."""
    path = build_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "string-llava", seed=0)
    (path / "chat_template.jinja").write_text(STRING_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def bare_checkpoint(string_checkpoint, tmp_path_factory):
    """The same checkpoint with no chat template at all."""
    path = tmp_path_factory.mktemp("ckpt") / "bare-llava"
    shutil.copytree(string_checkpoint, path)
    (path / "chat_template.jinja").unlink()
    return path


@pytest.fixture(scope="module")
def reference(string_checkpoint):
    return LlavaReference(string_checkpoint)


def rendered(reference, template: str, content: str) -> str:
    """What the string template makes of one user turn whose content is `content`."""
    return reference.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )


@pytest.fixture(scope="module")
def string_stack(string_checkpoint, image_dir, tmp_path_factory):
    with serving(string_checkpoint, image_dir, tmp_path_factory.mktemp("logs")) as served:
        yield served


def test_an_image_chat_equals_the_reference(string_stack, reference, image_dir):
    stack, http_base = string_stack
    response = greedy_chat(openai_client(stack), "What is in the image?", [f"{http_base}/a.png"], MAX_TOKENS)
    prompt = rendered(reference, STRING_TEMPLATE, "<image>\nWhat is in the image?")
    assert prompt == "USER: <image>\nWhat is in the image? ASSISTANT:"
    ref_prompt, ref_new = reference.greedy(prompt, [(image_dir / "a.png").read_bytes()], MAX_TOKENS)
    assert response.model_extra["prompt_token_ids"] == ref_prompt
    assert response.choices[0].model_extra["token_ids"] == ref_new
    assert len(set(ref_new)) > 3, "the reference output is degenerate; the comparison would be weak"


def test_a_text_chat_equals_the_reference(string_stack, reference):
    stack, _ = string_stack
    response = greedy_chat(openai_client(stack), "Describe a red car.", [], MAX_TOKENS)
    ref_prompt, ref_new = reference.greedy(
        rendered(reference, STRING_TEMPLATE, "Describe a red car."), [], MAX_TOKENS
    )
    assert response.model_extra["prompt_token_ids"] == ref_prompt
    assert response.choices[0].model_extra["token_ids"] == ref_new


def test_a_plain_string_message_and_a_multi_turn_chat(string_stack, reference):
    stack, _ = string_stack
    client = openai_client(stack)
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    prompt = reference.processor.tokenizer.decode(
        response.model_extra["prompt_token_ids"], skip_special_tokens=False
    )
    assert prompt.endswith("Be brief. USER: Hi ASSISTANT: Hello</s>USER: Bye ASSISTANT:")


def test_a_template_that_raises_is_a_400(string_stack):
    stack, _ = string_stack
    client = openai_client(stack)
    with pytest.raises(openai.BadRequestError, match="roles must alternate") as caught:
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
            max_tokens=4,
        )
    assert caught.value.body["type"] == "invalid_request_error"
    # ... and the stack keeps serving.
    assert greedy_chat(client, "Still there?", [], 2).choices[0].finish_reason in ("stop", "length")


def test_colliding_chat_template_kwargs_are_a_400(string_stack):
    stack, _ = string_stack
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "chat_template_kwargs": {"tokenize": True},
    }
    response = httpx.post(stack.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "chat_template_kwargs"


def test_the_override_serves_a_checkpoint_without_template(bare_checkpoint, image_dir, tmp_path, reference):
    template_file = tmp_path / "override.jinja"
    template_file.write_text(OVERRIDE_TEMPLATE)
    with serving(bare_checkpoint, image_dir, tmp_path, ["--chat-template", str(template_file)]) as (
        stack,
        base,
    ):
        response = greedy_chat(openai_client(stack), "What is this?", [f"{base}/c.png"], MAX_TOKENS)
    prompt = rendered(reference, OVERRIDE_TEMPLATE, "<image>\nWhat is this?")
    assert prompt == "A chat with a tiny model. USER: <image>\nWhat is this? ASSISTANT:"
    ref_prompt, ref_new = reference.greedy(prompt, [(image_dir / "c.png").read_bytes()], MAX_TOKENS)
    assert response.model_extra["prompt_token_ids"] == ref_prompt
    assert response.choices[0].model_extra["token_ids"] == ref_new


def test_no_template_is_a_400_on_chat_and_completions_still_serve(bare_checkpoint, image_dir, tmp_path):
    with serving(bare_checkpoint, image_dir, tmp_path) as (stack, base):
        client = openai_client(stack)
        with pytest.raises(openai.BadRequestError) as caught:
            greedy_chat(client, "Hello", [], 4)
        message = caught.value.body["message"]
        assert "no chat template" in message and "CHAT_TEMPLATE" in message and "/v1/completions" in message
        completion = client.completions.create(
            model=client.models.list().data[0].id,
            prompt="USER: <image>\nWhat is this? ASSISTANT:",
            max_tokens=4,
            temperature=0,
            extra_body={"urls": [f"{base}/a.png"]},
        )
        assert completion.usage.completion_tokens > 0
