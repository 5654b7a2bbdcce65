"""The gateway's cap on requests in flight (429 + Retry-After at once, before any work) and its per-request
time limit (504, or an SSE error event + [DONE]; the generation cancelled), on the real app over a real
ServingCore with a scripted LLM that can be held or slowed."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mmserve.errors import OverloadedError
from tests.gateway_app import CountingPrompt, make_app
from tests.helpers import exported_value
from tests.unit.test_api import ScriptedLLM

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class SlowLLM(ScriptedLLM):
    """Yields one token, then holds the rest until `release` is set (forever if it never is); records
    whether its stream was cancelled while it waited (how a cancellation reaches the engine)."""

    def __init__(self, tokenizer, prompt):
        super().__init__(tokenizer, prompt)
        self.answer = "Hello world, what is this?"
        self.release = asyncio.Event()
        self.generating = asyncio.Event()
        self.cancelled = False

    async def generate(self, request):
        inner = super().generate(request)
        try:
            yield await anext(inner)
            self.generating.set()
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        async for output in inner:
            yield output


@pytest.fixture()
def llm(tokenizer):  # tokenizer: tests/unit/conftest.py
    return SlowLLM(tokenizer, CountingPrompt(tokenizer))


def client(llm, **limits) -> httpx.AsyncClient:
    app = make_app(llm, **limits)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=30)


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, **fields}


def assert_openai_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    return error


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_a_request_over_the_cap_gets_429_with_retry_after_before_any_work(llm):
    async def go():
        async with client(llm, max_pending_requests=1) as http:
            first = asyncio.ensure_future(http.post(CHAT, json=chat()))
            await asyncio.wait_for(llm.generating.wait(), 10)
            tokenized = llm.prompt.tokenized
            refused = await http.post(COMPLETIONS, json={"prompt": "hi " * 1000, "max_tokens": 5})
            error = assert_openai_error(refused, 429, "rate_limit_error")
            assert refused.headers["retry-after"] == "1"
            assert "limit of 1 requests in flight" in error["message"]
            assert llm.prompt.tokenized == tokenized  # refused before its body was even read
            assert (await http.get("/v1/models")).status_code == 200  # only generations are capped
            llm.release.set()
            assert (await first).status_code == 200
            assert (await http.post(CHAT, json=chat())).status_code == 200  # its slot came back
            metrics = (await http.get("/metrics")).text
            refused_count = f'mmserve_gateway_requests_total{{route="{COMPLETIONS}",status="429"}}'
            assert exported_value(metrics, refused_count) == 1
            assert exported_value(metrics, "mmserve_gateway_requests_pending") == 0

    asyncio.run(go())


@pytest.mark.parametrize("stream", [False, True])
def test_the_llm_services_full_queue_is_a_429_with_retry_after(llm, monkeypatch, stream):
    async def overloaded(request):
        raise OverloadedError("waiting queue is full (256 requests)")
        yield  # an async generator, like the real client

    monkeypatch.setattr(llm, "generate", overloaded)

    async def go():
        async with client(llm) as http:
            return await http.post(CHAT, json=chat(stream=stream))

    response = asyncio.run(go())
    error = assert_openai_error(response, 429, "rate_limit_error")
    assert response.headers["retry-after"] == "1" and "queue is full" in error["message"]


def test_a_request_over_its_time_limit_gets_504_and_its_generation_is_cancelled(llm):
    async def go():
        async with client(llm, request_timeout_s=0.5) as http:
            return await http.post(CHAT, json=chat())

    response = asyncio.run(go())
    error = assert_openai_error(response, 504, "timeout")
    assert "time limit of 0.5 s" in error["message"] and "REQUEST_TIMEOUT" in error["message"]
    assert error["code"] == "timeout"
    assert llm.cancelled  # the LLM's stream was cancelled, not left running


def test_a_stream_over_its_time_limit_ends_with_an_error_event_then_done(llm):
    async def go():
        async with client(llm, request_timeout_s=0.5) as http:
            return await http.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 50, "stream": True})

    response = asyncio.run(go())
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    first, error = json.loads(events[0]), json.loads(events[-2])
    assert first["choices"][0]["text"]  # the first token came before the limit
    assert error["error"]["type"] == "timeout" and "time limit of 0.5 s" in error["error"]["message"]
    assert llm.cancelled


def test_requests_within_the_limit_are_untouched(llm):
    llm.release.set()

    async def go():
        async with client(llm, request_timeout_s=30) as http:
            return await http.post(CHAT, json=chat()), await http.post(CHAT, json=chat(stream=True))

    whole, streamed = asyncio.run(go())
    assert whole.json()["choices"][0]["message"]["content"] == llm.answer
    assert sse_events(streamed.text)[-1] == "[DONE]" and "error" not in streamed.text
    assert not llm.cancelled


def test_a_time_limit_of_zero_is_no_limit(llm):
    async def go():
        async with client(llm, request_timeout_s=0) as http:
            pending = asyncio.ensure_future(http.post(CHAT, json=chat()))
            await asyncio.wait_for(llm.generating.wait(), 10)
            await asyncio.sleep(0.3)
            assert not pending.done()
            llm.release.set()
            return await pending

    assert asyncio.run(go()).status_code == 200
