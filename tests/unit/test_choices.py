"""`n` choices per request (gateway/serving.py generate_choices): n LLM requests from one prompt, choice i
seeded seed + i, their deltas interleaved into one response (whole or streamed) in OpenAI's shapes, read
with the official client; one choice's failure ends the response and cancels the others. The app and
the clients are tests/unit/conftest.py's, over this module's `llm`."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.serving import TextDelta, interleave
from mmserve.errors import UnavailableError
from mmserve.wire import FinishReason, GenerateOutput, Usage
from tests.unit.test_api import MODEL, FakePrompt, ScriptedLLM

ANSWERS = ["red apple", "a green pear on a table", "blue sky over the hills today", "the sky"]
MESSAGES = [{"role": "user", "content": "hi"}]


class ChoiceLLM(ScriptedLLM):
    """Answers with ANSWERS[seed % 4] (seedless requests: ANSWERS[0]), one token per message, yielding to
    the event loop between messages so that concurrent choices interleave; `fail_seed` fails that
    request after two tokens. Records every request, and every generation closed before its end."""

    def __init__(self, tokenizer, prompt):
        super().__init__(tokenizer, prompt)
        self.fail_seed: int | None = None
        self.cancel_seed: int | None = None  # that request's call ends in CancelledError (not ours)
        self.closed_early: list[str] = []

    def ids_for(self, seed: int | None) -> list[int]:
        text = ANSWERS[0 if seed is None else seed % len(ANSWERS)]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, request):
        self.requests.append(request)
        seed = request.sampling.seed
        ids = self.ids_for(seed)
        done = False
        try:
            for i, token in enumerate(ids):
                await asyncio.sleep(0.001)
                if seed is not None and seed == self.fail_seed and i == 2:
                    raise UnavailableError("the llm replica went away")
                if seed is not None and seed == self.cancel_seed and i == 2:
                    raise asyncio.CancelledError()
                last = i == len(ids) - 1
                usage = (
                    Usage(len(request.token_ids), len(ids), cached_tokens=3 * (seed or 0)) if last else None
                )
                yield GenerateOutput([token], FinishReason.STOP if last else None, usage, None)
            done = True
        finally:
            if not done:
                self.closed_early.append(request.request_id)


@pytest.fixture()
def llm(tokenizer):
    return ChoiceLLM(tokenizer, FakePrompt(tokenizer))


def text_of(llm, seed):
    return llm.tokenizer.decode(llm.ids_for(seed))


def test_n_choices_each_seeded_in_turn_with_the_usage_of_all(client, llm):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=5, max_tokens=20)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [text_of(llm, s) for s in (5, 6, 7)]
    assert all(c.finish_reason == "stop" for c in response.choices)
    assert sorted(r.sampling.seed for r in llm.requests) == [5, 6, 7]
    assert len({r.request_id for r in llm.requests}) == 3
    assert all(r.token_ids == llm.requests[0].token_ids for r in llm.requests)
    prompt_len = len(llm.requests[0].token_ids)
    assert response.usage.prompt_tokens == prompt_len  # the prompt counts once
    assert response.usage.completion_tokens == sum(len(llm.ids_for(s)) for s in (5, 6, 7))
    assert response.usage.prompt_tokens_details.cached_tokens == 15  # the fewest any choice got


def test_streamed_choices_interleave_and_each_reassembles(client, llm):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        n=4,
        seed=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, roles, order = ["" for _ in range(4)], [None] * 4, [], []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        if choice.delta.role:
            roles.append(choice.index)
            assert not order, "every role chunk comes before any text"
            continue
        texts[choice.index] += choice.delta.content or ""
        order.append(choice.index)
        if choice.finish_reason:
            assert finishes[choice.index] is None
            finishes[choice.index] = choice.finish_reason
    assert roles == [0, 1, 2, 3]
    assert texts == [text_of(llm, s) for s in range(4)]
    assert finishes == ["stop"] * 4
    assert len(set(order[:4])) > 1, f"the choices' chunks are interleaved as they come: {order}"
    assert usage.completion_tokens == sum(len(llm.ids_for(s)) for s in range(4))


def test_completions_take_n_too(http, llm):
    body = {"prompt": "hi", "n": 2, "seed": 1, "max_tokens": 20, "return_token_ids": True}
    response = http.post("/v1/completions", json=body).json()
    assert [c["text"] for c in response["choices"]] == [text_of(llm, 1), text_of(llm, 2)]
    assert [c["token_ids"] for c in response["choices"]] == [llm.ids_for(1), llm.ids_for(2)]
    assert response["prompt_token_ids"] == llm.requests[0].token_ids


def test_without_a_seed_every_choice_is_unseeded(client, llm):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=20)
    assert len(response.choices) == 2 and all(r.sampling.seed is None for r in llm.requests)


def test_one_failing_choice_fails_the_response_and_cancels_the_others(http, llm):
    llm.fail_seed = 1  # choice 1 fails at its third token, while choice 2 (the longest answer) still runs
    body = {"messages": MESSAGES, "n": 3, "seed": 0, "max_tokens": 20}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 503
    assert "went away" in response.json()["error"]["message"]
    events = [
        json.loads(line[6:])
        for line in http.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
        if line.startswith("data: {")
    ]
    assert "went away" in events[-1]["error"]["message"]
    # in each response: choice 1 failed, and choice 2 (longer than the others) was closed where it was,
    # never left to run on
    closed = [rid.rsplit("-", 1)[1] for rid in llm.closed_early]
    assert closed.count("1") == 2 and closed.count("2") == 2


def test_a_choice_whose_call_is_cancelled_under_it_ends_the_response_at_once(http, llm):
    """A gRPC call cancelled by its channel ends in CancelledError without anyone cancelling the response:
    that choice's end must still reach the response, as an error, not leave it waiting for its deadline."""
    llm.cancel_seed = 1
    body = {"messages": MESSAGES, "n": 3, "seed": 0, "max_tokens": 20}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 503
    assert "choice 1's generation was cancelled" in response.json()["error"]["message"]
    closed = [rid.rsplit("-", 1)[1] for rid in llm.closed_early]
    assert closed.count("2") == 1  # the longest choice, closed where it was


def test_interleave_closes_every_generation_when_closed():
    closed = []

    async def gen(name: str):
        try:
            for i in range(100):
                await asyncio.sleep(0)
                yield TextDelta(f"{name}{i}", [i])
        finally:
            closed.append(name)

    async def main():
        merged = interleave([gen("a"), gen("b"), gen("c")])
        seen = [await anext(merged) for _ in range(5)]
        await merged.aclose()
        return seen

    seen = asyncio.run(main())
    assert {d.index for d in seen} <= {0, 1, 2}
    assert all(d.text[0] == "abc"[d.index] for d in seen)
    assert sorted(closed) == ["a", "b", "c"]
