"""32 requests at once through the whole stack, each greedy output equal to transformers' own
`generate` on that request alone (float32), with the engine squeezed so that every mechanism runs:
a small per-step token budget (chunked prefill), a KV cache too small for all of them (preemption
and recompute), small blocks, and repeated images behind different urls (prefix-cache hits)."""

from __future__ import annotations

import concurrent.futures
import io

import pytest
from PIL import Image

from tests.helpers import data_url, greedy_chat, openai_client, serving
from tests.reference import LlavaReference, assert_greedy_close, greedy_with_logprobs

MAX_TOKENS = 12
REQUESTS = 32
# 300 blocks of 4 tokens: about a third of what 32 requests need at once.
LLM_ARGS = ["--block-size", "4", "--kv-cache-bytes", str(300 * 1024), "--max-num-batched-tokens", "40"]
WORDS = "the red car parks near a tall tree while two birds sing over the quiet river at dawn".split()


def workload(image_dir, http_base):
    """(text, urls, image bytes) per request: 0-2 images, 3-60 words, images repeated across
    requests and sent by http or as data: urls."""
    names = ["a.png", "b.jpg", "c.png"]
    requests = []
    for i in range(REQUESTS):
        count = i % 3
        chosen = [names[(i + k) % 3] for k in range(count)]
        urls = [
            f"{http_base}/{name}" if (i + k) % 2 else data_url((image_dir / name).read_bytes())
            for k, name in enumerate(chosen)
        ]
        text = " ".join(WORDS[j % len(WORDS)] for j in range(i, i + 3 + (i * 7) % 58))
        requests.append((text, urls, [(image_dir / n).read_bytes() for n in chosen]))
    return requests


@pytest.fixture(scope="module")
def served(tiny_checkpoint, image_dir, tmp_path_factory):
    with serving(tiny_checkpoint, image_dir, tmp_path_factory.mktemp("logs"), llm_args=LLM_ARGS) as served:
        yield served


def test_32_concurrent_requests_match_reference_one_by_one(served, tiny_checkpoint, image_dir):
    stack, http_base = served
    client = openai_client(stack)
    requests = workload(image_dir, http_base)
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        futures = [pool.submit(greedy_chat, client, text, urls, MAX_TOKENS) for text, urls, _ in requests]
        responses = [f.result() for f in futures]

    reference = LlavaReference(tiny_checkpoint)
    for i, ((text, _, images), response) in enumerate(zip(requests, responses, strict=True)):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        inputs = reference.processor(
            text=reference.chat_prompt(text, len(images)), images=pil or None, return_tensors="pt"
        )
        assert response.model_extra["prompt_token_ids"] == inputs["input_ids"][0].tolist(), (
            f"request {i}: prompt ids differ"
        )
        expected, logprobs = greedy_with_logprobs(reference.model, inputs, MAX_TOKENS)
        ours = response.choices[0].model_extra["token_ids"]
        assert_greedy_close(ours, expected, logprobs, f"request {i}")

    # The squeeze worked as intended, and everything was given back.
    assert stack.llm_metric("mmserve_llm_preemptions_total") > 0
    assert stack.llm_metric("mmserve_llm_prefix_cache_hits_tokens") > 0
    assert stack.llm_metric("mmserve_llm_kv_cache_usage") == 0
    assert stack.llm_metric("mmserve_llm_running_requests") == 0
