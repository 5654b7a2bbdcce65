"""Embedding messages over gRPC's 4 MB default cross both service boundaries."""

from __future__ import annotations

import openai

from tests.conftest import WIDE_SHAPE
from tests.helpers import Stack, data_url
from tests.reference import LlavaReference


def test_over_4mb_embeddings_cross_the_stack(wide_checkpoint, image_dir, tmp_path):
    tokens = (WIDE_SHAPE.image_size // WIDE_SHAPE.patch_size) ** 2
    per_image = tokens * WIDE_SHAPE.text_hidden * 4  # float32 bytes
    assert per_image > 4 * 1024 * 1024
    images = [(image_dir / "a.png").read_bytes(), (image_dir / "c.png").read_bytes()]
    stack = Stack(wide_checkpoint, tmp_path).start()
    try:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        content = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
        response = client.chat.completions.create(
            model="wide-llava",
            messages=[{"role": "user", "content": content + [{"type": "text", "text": "Two big ones."}]}],
            temperature=0,
            max_tokens=8,
            extra_body={"return_token_ids": True},
        )
    finally:
        stack.stop()
    reference = LlavaReference(wide_checkpoint)
    ref_prompt, ref_new = reference.greedy(reference.chat_prompt("Two big ones.", 2), images, 8)
    assert response.usage.prompt_tokens == len(ref_prompt) > 2 * tokens
    assert response.choices[0].model_extra["token_ids"] == ref_new
