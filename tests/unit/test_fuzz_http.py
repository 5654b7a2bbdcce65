"""Property-based fuzzing of the HTTP edge: `/v1/chat/completions` and `/v1/completions` of the real FastAPI
app in process: a ServingCore over test_api.py's scripted LLM, as test_bad_input.py builds it, plus the real
chat template code (the demo llava template) and a fake vision client, so image parts get as far as the LLM.

Bodies are schema-shaped (each field absent, valid, or any JSON value: huge, negative and non-finite
numbers, lone surrogates, nesting, unknown fields, empty and huge strings, content parts of the wrong
type) or raw bytes (truncated and mutated JSON, deep nesting, huge literals, invalid UTF-8). Every
response must be a 200 that is well-formed JSON / SSE, or a 4xx in OpenAI's error shape; never a 5xx.
After the run a normal request still succeeds. Bounded and derandomized, so CI runs the same examples.
The strategies are tests/fuzz_json.py's and tests/fuzz_http_bodies.py's, the response checks
tests/fuzz_http_checks.py's.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.chat_template import ChatTemplate
from gateway.config import MediaConfig
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.serving import ServingCore
from mmserve.wire import ImageFeatures
from tests.fuzz_http_bodies import CHAT_BODY, COMPLETION_BODY, CONTENT_TYPES, PNG, raw_body
from tests.fuzz_http_checks import check, check_accepted, check_ok
from tests.fuzz_json import encode
from tests.fuzz_settings import fuzz_settings
from tests.gateway_app import CHAT, COMPLETIONS, assert_still_serving, send
from tests.unit.test_api import MODEL, FakePrompt, ScriptedLLM
from tools.checkpoints import LLAVA_CHAT_TEMPLATE, build_tokenizer

FUZZ = fuzz_settings(150)

# ---- the app under test -------------------------------------------------------------------------------


class FuzzPrompt(FakePrompt):
    """FakePrompt whose chats go through the real chat template code (the demo checkpoint's llava-hf
    template, openai content format: image parts become `<image>`, so images reach the fetcher and the
    vision client), chat_template_kwargs included."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.template = ChatTemplate(LLAVA_CHAT_TEMPLATE, "<image>\n", True, "\n")

    def render_chat(self, messages, chat_template_kwargs=None):
        return self.template.render(self.tokenizer, messages, chat_template_kwargs)


class FakeVision:
    """Two embedding rows per image."""

    async def embed(self, images, request_id, pixels=None):
        return [ImageFeatures(torch.zeros(2, 8), image.content_hash) for image in images]


@pytest.fixture(scope="module")
def harness():
    tokenizer = build_tokenizer()
    llm = ScriptedLLM(tokenizer, FuzzPrompt(tokenizer))
    llm.answer = "Hello world, fine."
    fetcher = MediaFetcher(MediaConfig(fetch_timeout_s=2.0))
    core = ServingCore(llm.prompt, FakeVision(), llm, fetcher, max_images_per_request=4)
    app = create_app(core, MODEL)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http, llm, app
    with TestClient(app, raise_server_exceptions=False) as http:
        assert_still_serving(http, llm)
    statuses = {
        s.labels["status"]
        for metric in app.state.metrics.registry.collect()
        if metric.name == "mmserve_gateway_requests"
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert {"200", "400"} <= statuses and not {s for s in statuses if s.startswith("5")}, statuses


def fuzz_one(harness, path: str, body) -> None:
    """Send `body` (a JSON value, or raw bytes); check the response, and for a 200 what reached the LLM."""
    http, llm, _ = harness
    before = len(llm.requests)
    response = send(http, path, body if isinstance(body, bytes) else encode(body))
    # a body that got a 200 asked for n choices (n is valid then), or for one
    choices = (body.get("n") or 1) if isinstance(body, dict) else None
    check(response, path, choices)
    if response.status_code == 200:
        new = llm.requests[before:]
        assert choices is None or len(new) == choices
        if not isinstance(body, bytes):
            first = new[0] if len(new) == 1 else next(r for r in new if r.request_id.endswith("-0"))
            check_accepted(body, path, first.sampling)


# ---- the properties --------------------------------------------------------------------------------------


@FUZZ
@given(body=CHAT_BODY)
def test_fuzzed_chat_bodies_never_get_a_5xx(harness, body):
    fuzz_one(harness, CHAT, body)


@FUZZ
@given(body=COMPLETION_BODY)
def test_fuzzed_completion_bodies_never_get_a_5xx(harness, body):
    fuzz_one(harness, COMPLETIONS, body)


@settings(FUZZ, max_examples=120)
@given(path=st.sampled_from([CHAT, COMPLETIONS]), body=raw_body(), content_type=CONTENT_TYPES)
def test_fuzzed_raw_bodies_never_get_a_5xx(harness, path, body, content_type):
    http, _, _ = harness
    check(send(http, path, body, content_type=content_type), path)


def test_valid_shapes_reach_the_llm(harness):
    """The strategies above are not all refusals: hand-picked bodies of the same shapes get 200s."""
    http, llm, _ = harness
    before = len(llm.requests)
    for path, body in [
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]},
        ),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "logprobs": True,
                "top_logprobs": 2,
            },
        ),
        (COMPLETIONS, {"prompt": "a <image> b", "urls": [PNG], "logprobs": 3, "return_token_ids": True}),
    ]:
        response = send(http, path, {**body, "max_tokens": 5})
        assert response.status_code == 200, response.text
        check_ok(response, path)
    assert len(llm.requests) == before + 3
    assert math.isfinite(llm.requests[-1].sampling.temperature)
