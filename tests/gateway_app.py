"""The gateway's real FastAPI app over a scripted LLM, for the HTTP-level tests (bad input, metrics,
fuzzing): the app builder, a prompt adapter that counts its tokenize calls, and request helpers."""

from __future__ import annotations

import json

from gateway.config import MediaConfig
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.serving import ServingCore
from tests.unit.test_api import MODEL, FakePrompt, ScriptedLLM

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_MODEL_LEN = 4096  # ScriptedLLM's


class CountingPrompt(FakePrompt):
    """FakePrompt that counts its tokenize calls (work done before the limits would show here)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.tokenized = 0

    def tokenize(self, text):
        self.tokenized += 1
        return super().tokenize(text)


def counting_llm(tokenizer) -> ScriptedLLM:
    return ScriptedLLM(tokenizer, CountingPrompt(tokenizer))


def make_app(llm, **kwargs):
    core = ServingCore(llm.prompt, None, llm, MediaFetcher(MediaConfig()), max_images_per_request=4)
    return create_app(core, MODEL, **kwargs)


def send(http, path: str, body, content_type: str | None = "application/json"):
    """`body`: a JSON value, sent as json.dumps writes it (lone surrogates as escapes, NaN and Infinity as
    literals), or raw bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type} if content_type else {}
    return http.post(path, content=content, headers=headers)


def assert_still_serving(http, llm):
    llm.answer = "fine"
    response = send(http, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "fine"


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields}


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}
