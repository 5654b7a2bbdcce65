"""The prefix cache through the whole stack: the same image behind two urls shares KV, another image
behind the same url shares none of the image's, and answers stay equal to transformers' own."""

from __future__ import annotations

import pytest

from tests.helpers import data_url, greedy_chat, make_image, openai_client, serving
from tests.reference import LlavaReference

MAX_TOKENS = 8
BLOCK = 4


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix-images")
    (folder / "photo.png").write_bytes(make_image(64, 48, seed=11))
    llm_args = ["--block-size", str(BLOCK)]
    with serving(tiny_checkpoint, folder, tmp_path_factory.mktemp("logs"), llm_args=llm_args) as (
        stack,
        base,
    ):
        yield stack, base, folder


def cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def test_same_image_shares_kv_and_another_image_at_the_same_url_does_not(served, tiny_checkpoint):
    stack, base, folder = served
    client = openai_client(stack)
    reference = LlavaReference(tiny_checkpoint)
    url = f"{base}/photo.png"
    first_bytes = (folder / "photo.png").read_bytes()

    first = greedy_chat(client, "What is this?", [url], MAX_TOKENS)
    prompt = first.model_extra["prompt_token_ids"]
    image_start = prompt.index(reference.model.config.image_token_id)
    image_end = len(prompt) - prompt[::-1].index(reference.model.config.image_token_id)
    assert cached(first) == 0

    # The same bytes as a data: url, with another question: everything up to the text is reused.
    second = greedy_chat(client, "Describe the colors.", [data_url(first_bytes)], MAX_TOKENS)
    assert cached(second) >= image_end // BLOCK * BLOCK
    ref_prompt, ref_new = reference.greedy(
        reference.chat_prompt("Describe the colors.", 1), [first_bytes], MAX_TOKENS
    )
    assert second.model_extra["prompt_token_ids"] == ref_prompt
    assert second.choices[0].model_extra["token_ids"] == ref_new

    # Another picture behind the same url: only the template before the image may be reused.
    other = make_image(64, 48, seed=12)
    (folder / "photo.png").write_bytes(other)
    third = greedy_chat(client, "What is this?", [url], MAX_TOKENS)
    assert cached(third) <= image_start
    ref_prompt, ref_new = reference.greedy(reference.chat_prompt("What is this?", 1), [other], MAX_TOKENS)
    assert third.choices[0].model_extra["token_ids"] == ref_new
    assert third.choices[0].model_extra["token_ids"] != first.choices[0].model_extra["token_ids"]

    assert stack.llm_metric("mmserve_llm_prefix_cache_hits_tokens") >= cached(second) + cached(third)
