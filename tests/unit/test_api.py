"""The HTTP routes over a real ServingCore with a scripted LLM: sampling fields reach SamplingParams,
logprobs come back in OpenAI's shapes (parsed by the official client), aligned with the text."""

from __future__ import annotations

import json
import math

import openai
import pytest
from fastapi.testclient import TestClient

from gateway.config import MediaConfig
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.serving import ServingCore
from mmserve.interfaces import PromptAdapter
from mmserve.wire import FinishReason, GenerateOutput, LLMInfo, TokenLogprobs, Usage
from tools.checkpoints import build_tokenizer

MODEL = "fake-model"


class FakePrompt(PromptAdapter):
    family = "fake"
    image_tag = "<image>"

    def __init__(self, tokenizer):  # type: ignore[override]  # a tokenizer instead of a checkpoint
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_tag)

    def render_chat(self, messages, chat_template_kwargs=None):
        return " ".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text")

    def normalize_raw(self, prompt):
        return prompt

    def tokenize(self, text):
        return self.tokenizer(text)["input_ids"]


class ScriptedLLM:
    """Answers every request with `answer`'s tokens, one per message; the sampled token's logprob is
    -0.5 - 0.01 * position, its alternatives the next ids down by 1 each."""

    def __init__(self, tokenizer, prompt):
        self.tokenizer, self.prompt = tokenizer, prompt
        self.answer = ""
        self.requests = []

    def answer_ids(self) -> list[int]:
        return self.tokenizer(self.answer, add_special_tokens=False)["input_ids"]

    async def model_info(self):
        return LLMInfo("llava", 4096, self.prompt.image_token_id, 8, (self.tokenizer.eos_token_id,))

    async def generate(self, request):
        self.requests.append(request)
        ids = self.answer_ids()
        n = request.sampling.logprobs
        for i, token in enumerate(ids):
            logprobs = None
            if n is not None:
                value = -0.5 - 0.01 * i
                top = [(token, value)] + [((token + k) % 300, value - k) for k in range(1, n)]
                logprobs = [TokenLogprobs(value, top[:n])]
            last = i == len(ids) - 1
            yield GenerateOutput(
                [token],
                FinishReason.LENGTH if last else None,
                Usage(len(request.token_ids), len(ids)) if last else None,
                logprobs,
            )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def llm(tokenizer):
    return ScriptedLLM(tokenizer, FakePrompt(tokenizer))


@pytest.fixture()
def http(llm, tokenizer):
    core = ServingCore(llm.prompt, None, llm, MediaFetcher(MediaConfig()), max_images_per_request=4)
    with TestClient(create_app(core, MODEL)) as client:
        yield client


def post_chat(http, **body):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, **body}
    return http.post("/v1/chat/completions", json=body)


def sse(response) -> list[dict]:
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- requests ----------------------------------------------------------------------------------


def test_sampling_fields_reach_the_llm(http, llm):
    llm.answer = "ok"
    body = {"presence_penalty": 0.5, "frequency_penalty": -0.25, "min_p": 0.1, "top_k": 5, "min_tokens": 1}
    assert post_chat(http, logprobs=True, top_logprobs=3, **body).status_code == 200
    params = llm.requests[-1].sampling
    assert (params.presence_penalty, params.frequency_penalty, params.min_p, params.top_k) == (
        0.5,
        -0.25,
        0.1,
        5,
    )
    assert params.min_new_tokens == 1 and params.logprobs == 3
    post_chat(http, logprobs=True)
    assert llm.requests[-1].sampling.logprobs == 0
    post_chat(http)
    assert llm.requests[-1].sampling.logprobs is None
    http.post("/v1/completions", json={"prompt": "hi", "logprobs": 2})
    assert llm.requests[-1].sampling.logprobs == 2


@pytest.mark.parametrize(
    "body,param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -9}, "frequency_penalty"),
        ({"min_p": 2}, "min_p"),
    ],
)
def test_bad_fields_are_openai_400s_naming_the_field(http, body, param):
    response = post_chat(http, **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)


def test_the_openai_client_sees_the_400(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs requires logprobs"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], top_logprobs=2
        )


# ---- chat responses ----------------------------------------------------------------------------


def test_chat_logprobs_with_the_openai_client(client, llm, tokenizer):
    llm.answer = "Hello world, what is in the image?"
    ids = llm.answer_ids()
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == len(ids) == response.usage.completion_tokens
    for i, (entry, token) in enumerate(zip(content, ids, strict=True)):
        assert entry.token == tokenizer.decode([token])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(-0.5 - 0.01 * i)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([entry.logprob - k for k in range(3)])
    assert "".join(e.token for e in content) == response.choices[0].message.content == llm.answer


def test_chat_logprobs_are_null_unless_requested(http, llm):
    llm.answer = "Hello"
    assert post_chat(http).json()["choices"][0]["logprobs"] is None
    chunks = sse(post_chat(http, stream=True))
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)
    content = post_chat(http, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert content and all(e["top_logprobs"] == [] for e in content)


def test_streamed_chat_chunks_carry_the_logprobs_of_their_text(client, llm):
    llm.answer = "Hello world, what is in the image?"
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2, stream=True
    )
    streamed = []
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.logprobs is None:  # the role chunk
            continue
        assert "".join(e.token for e in choice.logprobs.content) == (choice.delta.content or "")
        streamed.extend(choice.logprobs.content)
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2
    )
    assert streamed == full.choices[0].logprobs.content


def test_stop_string_drops_the_logprobs_of_tokens_after_the_cut(http, llm, tokenizer):
    llm.answer = "Hello world STOP what is in the image"
    ids = llm.answer_ids()
    for stream in (False, True):
        response = post_chat(http, stop=["STOP"], logprobs=True, stream=stream)
        if stream:
            choices = [c["choices"][0] for c in sse(response)[1:]]
            text = "".join(c["delta"].get("content", "") for c in choices)
            content = [e for c in choices for e in c["logprobs"]["content"]]
        else:
            choice = response.json()["choices"][0]
            text, content = choice["message"]["content"], choice["logprobs"]["content"]
        assert text == "Hello world "
        tokens = [e["token"] for e in content]
        # every token up to the one where "STOP" begins; nothing after it
        assert "".join(tokens).startswith(text) and len(tokens) < len(ids)
        assert "what" not in "".join(tokens) and len("".join(tokens)) <= len(text) + len(" STOP")


def test_multibyte_characters_get_every_token_logprob(http, llm, tokenizer):
    llm.answer = "naïve café 😀 图片"
    ids = llm.answer_ids()
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the test needs a split character"
    choices = [c["choices"][0] for c in sse(post_chat(http, logprobs=True, stream=True))[1:]]
    content = [e for c in choices for e in c["logprobs"]["content"]]
    assert len(content) == len(ids)
    assert "".join(c["delta"].get("content", "") for c in choices) == llm.answer


def test_infinite_logprobs_become_finite_json(http, llm, monkeypatch):
    llm.answer = "Hi"

    async def generate(request):
        yield GenerateOutput(
            [5], FinishReason.LENGTH, Usage(1, 1), [TokenLogprobs(-0.1, [(5, -0.1), (6, -math.inf)])]
        )

    monkeypatch.setattr(llm, "generate", generate)
    response = post_chat(http, logprobs=True, top_logprobs=2)
    assert response.status_code == 200
    assert [
        t["logprob"] for t in response.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    ] == [
        pytest.approx(-0.1),
        -9999.0,
    ]


# ---- completions -------------------------------------------------------------------------------


def test_completion_logprobs_shape_and_offsets(client, llm, tokenizer):
    llm.answer = "Hello world, what is this?"
    ids = llm.answer_ids()
    response = client.completions.create(model=MODEL, prompt="hi", logprobs=2, max_tokens=50)
    choice = response.choices[0]
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs == pytest.approx([-0.5 - 0.01 * i for i in range(len(ids))])
    for i, top in enumerate(lp.top_logprobs):
        assert lp.tokens[i] in top and len(top) in (2, 3)  # the alternatives, plus the sampled token
        assert top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])
    assert lp.text_offset[0] == 0
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset:].startswith(token)


def test_streamed_completion_logprobs_match_the_full_response(client, llm):
    llm.answer = "Hello world, what is this?"
    full = client.completions.create(model=MODEL, prompt="hi", logprobs=1, max_tokens=50).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in client.completions.create(model=MODEL, prompt="hi", logprobs=1, max_tokens=50, stream=True):
        lp = chunk.choices[0].logprobs
        tokens += lp.tokens
        offsets += lp.text_offset
    assert tokens == full.tokens and offsets == full.text_offset


USAGE = {"include_usage": True}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("logprobs", [False, True])
def test_every_streamed_event_is_its_chunk_as_json_dumps_writes_it(http, llm, path, logprobs):
    """The chunks' envelope is written once per stream (gateway/http/render.py); each event must still be
    byte for byte what json.dumps(chunk, ensure_ascii=False) writes, whatever the text holds."""
    llm.answer = 'Héllo "wörld"\n\t图片 \\ end'
    body = {"max_tokens": 50, "stream": True, "return_token_ids": True, "stream_options": USAGE}
    if path == "/v1/completions":
        body |= {"prompt": "hi", "logprobs": 2 if logprobs else None}
    else:
        body |= {"messages": [{"role": "user", "content": "hi"}], "logprobs": logprobs}
    response = http.post(path, json=body)
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 5
    for event in events[:-1]:
        assert event == json.dumps(json.loads(event), ensure_ascii=False)
    text = "".join(
        c["delta"].get("content", "") if "delta" in c else c["text"]
        for chunk in map(json.loads, events[:-1])
        for c in chunk["choices"]
    )
    assert text == llm.answer
