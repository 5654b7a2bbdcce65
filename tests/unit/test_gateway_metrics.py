"""The gateway's metrics count what really happened, against the real FastAPI app over a scripted LLM
(fixtures in tests/unit/conftest.py): every response by route and status (413 and 401 included), and a
request's outcome and latency recorded when it ends (a stream: its last event, or the client gone)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.gateway_app import (
    CHAT,
    MAX_MODEL_LEN,
    CountingPrompt,
    chat,
    make_app,
    send,
    user,
)
from tests.unit.test_api import ScriptedLLM


def sample(app, name: str, **labels) -> float:
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def requests_count(app, route: str, status: int) -> float:
    return sample(app, "mmserve_gateway_requests_total", route=route, status=str(status))


def test_every_response_is_counted_by_route_and_status(app, http, llm):
    llm.answer = "ok"
    send(http, CHAT, chat(temperature="hot"))
    send(http, CHAT, chat(model="gpt-4"))
    send(http, "/v1/nope", chat())
    send(http, "/v1/nope/" + "x" * 50, chat())
    send(http, CHAT, chat())
    http.get("/v1/models")
    assert requests_count(app, CHAT, 400) == 1
    assert requests_count(app, CHAT, 404) == 1
    assert requests_count(app, "unknown", 404) == 2  # unknown paths share one label
    assert requests_count(app, CHAT, 200) == 1
    assert requests_count(app, "/v1/models", 200) == 1
    assert sample(app, "mmserve_gateway_request_outcomes_total", route=CHAT, outcome="completed") == 1
    # a request past validation that fails (here: the context check) ends in an error
    assert sample(app, "mmserve_gateway_request_outcomes_total", route=CHAT, outcome="error") == 0
    send(http, CHAT, chat(max_tokens=MAX_MODEL_LEN + 1))
    assert sample(app, "mmserve_gateway_request_outcomes_total", route=CHAT, outcome="error") == 1
    assert requests_count(app, CHAT, 400) == 2


def test_413_and_401_are_counted(llm):
    app = make_app(llm, max_request_bytes=1000, api_key="sekret")
    llm.answer = "ok"
    with TestClient(app) as client:
        assert client.post(CHAT, json=chat()).status_code == 401
        auth = {"authorization": "Bearer sekret", "content-type": "application/json"}
        assert client.post(CHAT, content=json.dumps(user("x" * 2000)), headers=auth).status_code == 413
        assert client.post(CHAT, content=json.dumps(chat()), headers=auth).status_code == 200
    assert requests_count(app, CHAT, 401) == 1
    assert requests_count(app, CHAT, 413) == 1
    assert requests_count(app, CHAT, 200) == 1


class GatedLLM(ScriptedLLM):
    """Yields one token, then waits for `gate` before the rest; records whether its stream was closed."""

    def __init__(self, tokenizer, prompt):
        super().__init__(tokenizer, prompt)
        self.gate = threading.Event()
        self.closed = False

    async def generate(self, request):
        try:
            inner = super().generate(request)
            yield await anext(inner)
            until = time.monotonic() + 60  # polled, not a blocking wait: cancelling this must stop it
            while not self.gate.is_set():
                assert time.monotonic() < until, "the test never opened the gate"
                await asyncio.sleep(0.005)
            async for output in inner:
                yield output
        finally:
            self.closed = True


async def call_asgi(app, body: dict, spec_version: str = "2.3", wait_for_body: bool = True):
    """Drives the app like a server; returns (task, chunks, disconnect): `chunks` fills with the response's
    body messages, setting `disconnect` makes the client go away."""
    disconnect = asyncio.Event()
    sent_body = False
    chunks: list[bytes] = []
    started = asyncio.Event()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            started.set()
        if disconnect.is_set():
            raise OSError("client gone")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    if wait_for_body:
        await asyncio.wait_for(started.wait(), 10)
    return task, chunks, disconnect


@pytest.fixture()
def gated(tokenizer):
    return GatedLLM(tokenizer, CountingPrompt(tokenizer))


def outcomes(app) -> dict[str, float]:
    return {
        o: sample(app, "mmserve_gateway_request_outcomes_total", route=CHAT, outcome=o)
        for o in ("completed", "error", "client_disconnected")
    }


def e2e_count(app) -> float:
    return sum(
        sample(app, "mmserve_gateway_e2e_seconds_count", route=CHAT, outcome=o)
        for o in ("completed", "error", "client_disconnected")
    )


def test_a_stream_records_its_outcome_and_latency_when_it_ends(gated):
    app = make_app(gated)
    gated.answer = "Hello world, what is this?"

    async def go():
        task, chunks, _ = await call_asgi(app, chat(stream=True, max_tokens=50))
        await asyncio.sleep(0.05)
        assert not task.done() and chunks  # the response is out, the stream is not over
        assert outcomes(app) == {"completed": 0, "error": 0, "client_disconnected": 0}
        assert e2e_count(app) == 0
        assert requests_count(app, CHAT, 200) == 1  # the status is counted as it is sent
        gated.gate.set()
        await asyncio.wait_for(task, 10)
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")

    asyncio.run(go())
    assert outcomes(app) == {"completed": 1, "error": 0, "client_disconnected": 0}
    assert e2e_count(app) == 1 and gated.closed


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_stream_whose_client_leaves_is_recorded_as_disconnected(gated, spec_version):
    """ASGI 2.3 servers report the disconnect (the response listens for it); under 2.4 the next send fails."""
    app = make_app(gated)
    gated.answer = "Hello world, what is this?"

    async def go():
        task, chunks, disconnect = await call_asgi(app, chat(stream=True, max_tokens=50), spec_version)
        disconnect.set()
        gated.gate.set()
        try:
            await asyncio.wait_for(task, 10)
        except OSError:
            pass  # starlette's ClientDisconnect under 2.4
        except Exception as exc:  # noqa: BLE001
            assert type(exc).__name__ == "ClientDisconnect"

    asyncio.run(go())
    assert outcomes(app) == {"completed": 0, "error": 0, "client_disconnected": 1}
    assert e2e_count(app) == 1 and gated.closed


def test_a_stream_that_fails_midway_is_recorded_as_an_error(llm, monkeypatch):
    from mmserve.errors import UnavailableError
    from mmserve.wire import GenerateOutput

    app = make_app(llm)

    async def generate(request):
        yield GenerateOutput([llm.answer_ids()[0]], None, None, None)
        raise UnavailableError("llm service is unavailable")

    llm.answer = "Hello world"
    monkeypatch.setattr(llm, "generate", generate)
    with TestClient(app) as client:
        response = send(client, CHAT, chat(stream=True))
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "llm service is unavailable" in events[-2]
    assert outcomes(app) == {"completed": 0, "error": 1, "client_disconnected": 0}


def test_a_client_leaving_a_non_streamed_request_is_recorded(gated):
    app = make_app(gated)
    gated.answer = "Hello world, what is this?"

    async def go():
        task, chunks, disconnect = await call_asgi(app, chat(max_tokens=50), wait_for_body=False)
        await asyncio.sleep(0.1)
        assert not task.done() and not chunks
        disconnect.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

    asyncio.run(go())
    assert outcomes(app) == {"completed": 0, "error": 0, "client_disconnected": 1}
    assert requests_count(app, CHAT, 499) == 1 and gated.closed
