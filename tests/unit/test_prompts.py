import pytest
import torch

from gateway.prompt_llava import LlavaPrompt
from gateway.prompts import expand_image_tokens
from mmserve.errors import InvalidInputError
from mmserve.wire import ImageFeatures
from tests.checkpoints.hub import REFERENCE_DIR


def features(*rows):
    return [ImageFeatures(embedding=torch.zeros(n, 4), content_hash=f"h{i}") for i, n in enumerate(rows)]


def test_expansion_uses_the_vision_service_counts():
    ids, spans = expand_image_tokens([1, 9, 5, 9, 6], 9, features(3, 2))
    assert ids == [1, 9, 9, 9, 5, 9, 9, 6]
    assert [(s.offset, s.length, s.content_hash) for s in spans] == [(1, 3, "h0"), (5, 2, "h1")]


def test_count_mismatch_names_both_numbers():
    with pytest.raises(InvalidInputError, match="has 1 image tags but 2 images"):
        expand_image_tokens([1, 9, 5], 9, features(3, 2))


def test_llava_prompt_matches_the_hf_processor(tiny_checkpoint):
    from transformers import AutoProcessor

    prompt = LlavaPrompt(str(tiny_checkpoint), str(tiny_checkpoint))
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = prompt.render_chat(messages)
    assert (
        text
        == processor.apply_chat_template(messages, add_generation_prompt=True)
        == "USER: <image>\nWhat is this? ASSISTANT:"
    )
    ids = prompt.tokenize(text)
    assert ids[0] == prompt.tokenizer.bos_token_id and ids.count(prompt.image_token_id) == 1
    assert prompt.normalize_raw("Picture 1:<img/>\nhi") == "Picture 1:<image>\nhi"


# ---- chat templates of both content formats ----------------------------------------------------

STRING_CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRING_LLAVA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def test_llava_string_template_puts_image_tags_first(tiny_checkpoint):
    parts = LlavaPrompt(str(tiny_checkpoint), str(tiny_checkpoint))
    string = LlavaPrompt(str(tiny_checkpoint), str(tiny_checkpoint), chat_template=STRING_LLAVA)
    assert (parts.template.content_format, string.template.content_format) == ("openai", "string")
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}]
    assert (
        string.render_chat(messages)
        == parts.render_chat(messages)
        == "USER: <image>\nWhat is this? ASSISTANT:"
    )
    assert string.tokenize(string.render_chat(messages)).count(string.image_token_id) == 1


@pytest.fixture(scope="module")
def qwen2_vl_checkpoint(tmp_path_factory):
    from tests.checkpoints.qwen2_vl import build_qwen2_vl_checkpoint

    return build_qwen2_vl_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl", seed=0)


def test_qwen2_vl_string_template_renders_like_its_own(qwen2_vl_checkpoint):
    from gateway.prompt_qwen2_vl import Qwen2VLPrompt

    path = str(qwen2_vl_checkpoint)
    own = Qwen2VLPrompt(path, path)
    string = Qwen2VLPrompt(path, path, chat_template=STRING_CHATML)
    assert (own.template.content_format, string.template.content_format) == ("openai", "string")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " and "},
                {"type": "image"},
            ],
        }
    ]
    assert string.render_chat(messages) == own.render_chat(messages)
    assert own.render_chat(messages).count("<|vision_start|><|image_pad|><|vision_end|>") == 2

    # the released template, with its add_vision_id switch
    reference = REFERENCE_DIR / "Qwen__Qwen2-VL-2B-Instruct/chat_template.json"
    released = Qwen2VLPrompt(path, path, chat_template=str(reference))
    assert released.render_chat(messages) == own.render_chat(messages)
    numbered = released.render_chat(messages, chat_template_kwargs={"add_vision_id": True})
    assert "Picture 1: <|vision_start|>" in numbered and "Picture 2: <|vision_start|>" in numbered
