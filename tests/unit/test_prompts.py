import pytest
import torch

from gateway.prompts import LlavaPrompt, expand_image_tokens
from mmserve.errors import InvalidInputError
from mmserve.wire import ImageFeatures


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
