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


def test_n_choices_are_the_seeded_requests_one_by_one(client, served):
    """n=3 with a seed: choice i is what a request of its own seeded seed + i gives (vLLM's rule), the
    prompt computed once and counted once; streamed, the same choices reassemble from interleaved chunks;
    greedy, every choice is the greedy answer."""
    kwargs = {"temperature": 1.0, "extra_body": {"top_k": 50, "return_token_ids": True}}
    several = chat(client, served, n=3, seed=77, **kwargs)
    alone = [chat(client, served, seed=77 + i, **kwargs) for i in range(3)]
    ids = [c.model_extra["token_ids"] for c in several.choices]
    assert ids == [a.choices[0].model_extra["token_ids"] for a in alone]
    assert len({tuple(i) for i in ids}) > 1, "seeds 77, 78, 79 drew the same tokens"
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert several.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    texts = ["", "", ""]
    for chunk in chat(client, served, n=3, seed=77, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in several.choices]

    greedy = chat(client, served, n=2)
    assert [c.message.content for c in greedy.choices] == [
        chat(client, served).choices[0].message.content
    ] * 2


def test_n_choices_compute_their_prompt_once(client, served):
    """The choices of one request are separate sequences in the LLM service, but the prompt's KV is
    computed once: the others wait for its blocks and take them from the prefix cache."""
    stack, http_base = served
    content = [
        {"type": "text", "text": "A prompt no other test sends, so that nothing of it is cached yet:"},
        {"type": "image_url", "image_url": {"url": f"{http_base}/a.png"}},
    ]

    def counters():
        return [
            stack.llm_metric(f"mmserve_llm_{name}_total")
            for name in ("prompt_tokens", "cached_prompt_tokens")
        ]

    before = counters()
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        n=3,
        max_tokens=4,
        temperature=0,
    )
    admitted, cached = (after - b for after, b in zip(counters(), before, strict=True))
    prompt = response.usage.prompt_tokens
    assert admitted == 3 * prompt
    assert admitted - cached < 1.5 * prompt, (
        f"{admitted - cached} prompt tokens computed for 3 choices of {prompt}"
    )


def ids_of(response) -> list[int]:
    return response.choices[0].model_extra["token_ids"]


def test_logit_bias_bans_and_forces_tokens(client, served):
    kwargs = {"logprobs": True, "top_logprobs": 2, "extra_body": {"return_token_ids": True}}
    greedy = chat(client, served, **kwargs)
    first = ids_of(greedy)[0]
    top = greedy.choices[0].logprobs.content[0].top_logprobs
    assert top[0].logprob > top[1].logprob + 1e-3  # no near-tie at the first token
    banned = chat(client, served, logit_bias={str(first): -100}, **kwargs)
    entry = banned.choices[0].logprobs.content[0]
    assert ids_of(banned)[0] != first
    # logprobs stay those of the raw distribution (the same alternatives), and greedy picks the runner-up
    assert [t.token for t in entry.top_logprobs] == [t.token for t in top]
    assert entry.token == top[1].token
    # +100 on one token: greedy writes nothing else (ignore_eos keeps it from ending early)
    forced = chat(
        client,
        served,
        logit_bias={"42": 100},
        max_tokens=6,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert ids_of(forced) == [42] * 6


def test_stop_token_ids_end_the_generation(client, served):
    base = chat(client, served, max_tokens=12, extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = ids_of(base)
    stop_at = next(i for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])  # its first occurrence
    stopped = chat(
        client, served, max_tokens=12, extra_body={"return_token_ids": True, "stop_token_ids": [ids[stop_at]]}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert ids_of(stopped) == ids[: stop_at + 1]
    assert stopped.usage.completion_tokens == stop_at + 1


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"logit_bias": {"abc": 1}}, "keys are token ids"),
        ({"logit_bias": {"01": 1, "1": 2}}, "keys are token ids"),
        ({"logit_bias": {"5": 101}}, "in [-100, 100]"),
        ({"logit_bias": {"999999999": 5}}, "logit_bias token ids must be in [0, "),
        ({"stop_token_ids": [-1]}, "greater than or equal to 0"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids must be in [0, "),
    ],
)
def test_bad_logit_bias_and_stop_token_ids_are_400s(client, served, extra, says):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, served, extra_body=extra)
    assert says in caught.value.body["message"], caught.value.body
