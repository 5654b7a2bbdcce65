"""Logprobs and the new sampling fields through the three-process stack, with the official openai client."""

from __future__ import annotations

import pytest

MAX_TOKENS = 12


def chat(client, served, **kwargs):
    _, http_base = served
    content = [
        {"type": "image_url", "image_url": {"url": f"{http_base}/a.png"}},
        {"type": "text", "text": "What is in the image?"},
    ]
    kwargs = {"temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_greedy_chat_logprobs(client, served):
    response = chat(client, served, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens > 0  # one entry per generated token
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and all(t.logprob <= 0 for t in entry.top_logprobs)
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert entry.token in [t.token for t in entry.top_logprobs]
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.bytes == list(entry.token.encode())
    plain = chat(client, served)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == response.choices[0].message.content


def test_streamed_chat_logprobs_equal_the_full_response(client, served):
    full = chat(client, served, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = []
    for chunk in chat(client, served, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert streamed == full


def test_completion_logprobs(client, served):
    _, http_base = served
    response = client.completions.create(
        model=client.models.list().data[0].id,
        prompt="USER: <image>\nWhat is this? ASSISTANT:",
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=2,
        extra_body={"urls": [f"{http_base}/a.png"]},
    )
    lp = response.choices[0].logprobs
    n = response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and top[token] == pytest.approx(value) and max(top.values()) == pytest.approx(value)
    assert lp.text_offset == sorted(lp.text_offset)


def test_seeded_sampling_with_penalties_and_min_p_repeats(client, served):
    kwargs = {
        "temperature": 1.0,
        "seed": 1234,
        "presence_penalty": 1.0,
        "frequency_penalty": 0.5,
        "extra_body": {"min_p": 0.02, "top_k": 50, "return_token_ids": True},
    }
    first, second = (chat(client, served, **kwargs).choices[0].model_extra["token_ids"] for _ in range(2))
    assert first == second and len(first) > 0
