"""Hostile and malformed requests against the real FastAPI app (a ServingCore over a scripted LLM): each
gets a 4xx in OpenAI's error shape naming the field at fault, no work is done before the limits, the app
answers a normal request afterwards; and the gateway's metrics count what really happened."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.config import MediaConfig
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.serving import MAX_BYTES_PER_TOKEN, ServingCore
from tests.unit.test_api import MODEL, FakePrompt, ScriptedLLM
from tools.checkpoints import build_tokenizer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_MODEL_LEN = 4096  # ScriptedLLM's
SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800"


class CountingPrompt(FakePrompt):
    """FakePrompt that counts its tokenize calls (work done before the limits would show here)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.tokenized = 0

    def tokenize(self, text):
        self.tokenized += 1
        return super().tokenize(text)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def llm(tokenizer):
    return ScriptedLLM(tokenizer, CountingPrompt(tokenizer))


def make_app(llm, **kwargs):
    core = ServingCore(llm.prompt, None, llm, MediaFetcher(MediaConfig()), max_images_per_request=4)
    return create_app(core, MODEL, **kwargs)


@pytest.fixture()
def app(llm):
    return make_app(llm)


@pytest.fixture()
def http(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def send(http, path: str, body, content_type: str | None = "application/json"):
    """`body`: a JSON value, sent as json.dumps writes it (lone surrogates as escapes, NaN and Infinity as
    literals), or raw bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type} if content_type else {}
    return http.post(path, content=content, headers=headers)


def assert_openai_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] is None or isinstance(error["code"], str)
    assert error["param"] == param, error
    if param is not None:
        assert error["message"].startswith(param + ":"), error["message"]
    return error


def assert_still_serving(http, llm):
    llm.answer = "fine"
    response = send(http, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "fine"


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields}


def completion(**fields) -> dict:
    return {"prompt": "hi", "max_tokens": 5, **fields}


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


def image(image_url) -> dict:
    return user([{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": image_url}])


NAN, INF = float("nan"), float("inf")

# (id, path, body, status, param): body is a JSON value (see `send`) or raw bytes
CASES = [
    # ---- body framing -----------------------------------------------------------------------------
    ("invalid-json", CHAT, b'{"messages": [', 400, None),
    ("json-array", CHAT, [], 400, None),
    ("json-string", CHAT, "hi", 400, None),
    ("json-number", COMPLETIONS, 5, 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("invalid-utf8-bytes", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("huge-integer-literal", CHAT, b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("deeply-nested", CHAT, b'{"stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    # ---- sampling fields: range and type ----------------------------------------------------------
    ("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature-3", CHAT, chat(temperature=3), 400, "temperature"),
    ("temperature-string", CHAT, chat(temperature="0.5"), 400, "temperature"),
    ("temperature-bool", CHAT, chat(temperature=True), 400, "temperature"),
    ("temperature-nan", CHAT, chat(temperature=NAN), 400, "temperature"),
    ("temperature-infinity", CHAT, chat(temperature=INF), 400, "temperature"),
    ("top_p-0", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p-1.5", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_k-minus-2", CHAT, chat(top_k=-2), 400, "top_k"),
    ("top_k-string", CHAT, chat(top_k="5"), 400, "top_k"),
    ("top_k-over-int32", CHAT, chat(top_k=2**31), 400, "top_k"),
    ("max_tokens-0", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-negative", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-1.5", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens-string", COMPLETIONS, completion(max_tokens="10"), 400, "max_tokens"),
    ("max_completion_tokens-0", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("min_tokens-negative", CHAT, chat(min_tokens=-1), 400, "min_tokens"),
    ("min_tokens-string", CHAT, chat(min_tokens="1"), 400, "min_tokens"),
    ("seed-2**64", CHAT, chat(seed=2**64), 400, "seed"),
    ("seed-below-int64", CHAT, chat(seed=-(2**63) - 1), 400, "seed"),
    ("stop-17-strings", CHAT, chat(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("stop-non-string", CHAT, chat(stop=[1]), 400, "stop[0]"),
    ("stop-number", CHAT, chat(stop=5), 400, "stop"),
    ("stream-yes", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream-1", CHAT, chat(stream=1), 400, "stream"),
    (
        "stream_options-include_usage-string",
        CHAT,
        chat(stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
    ),
    ("n-2", CHAT, chat(n=2), 400, "n"),
    ("n-2-completions", COMPLETIONS, completion(n=2), 400, "n"),
    ("logprobs-string", CHAT, chat(logprobs="true"), 400, "logprobs"),
    ("top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("completion-logprobs-21", COMPLETIONS, completion(logprobs=21), 400, "logprobs"),
    ("completion-logprobs-bool", COMPLETIONS, completion(logprobs=True), 400, "logprobs"),
    ("presence_penalty-2.5", CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    ("frequency_penalty-minus-3", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty-0", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("repetition_penalty-negative", CHAT, chat(repetition_penalty=-1), 400, "repetition_penalty"),
    ("repetition_penalty-infinity", CHAT, chat(repetition_penalty=INF), 400, "repetition_penalty"),
    ("repetition_penalty-nan", CHAT, chat(repetition_penalty=NAN), 400, "repetition_penalty"),
    ("min_p-2", CHAT, chat(min_p=2), 400, "min_p"),
    ("ignore_eos-string", CHAT, chat(ignore_eos="false"), 400, "ignore_eos"),
    ("return_token_ids-1", COMPLETIONS, completion(return_token_ids=1), 400, "return_token_ids"),
    (
        "mm_processor_kwargs-0-pixels",
        CHAT,
        chat(mm_processor_kwargs={"min_pixels": 0}),
        400,
        "mm_processor_kwargs.min_pixels",
    ),
    (
        "mm_processor_kwargs-unknown-key",
        CHAT,
        chat(mm_processor_kwargs={"foo": 1}),
        400,
        "mm_processor_kwargs.foo",
    ),
    (
        "chat_template_kwargs-reserved",
        CHAT,
        chat(chat_template_kwargs={"messages": []}),
        400,
        "chat_template_kwargs",
    ),
    ("model-number", CHAT, chat(model=5), 400, "model"),
    # ---- messages ---------------------------------------------------------------------------------
    ("messages-missing", CHAT, {"max_tokens": 5}, 400, "messages"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("message-not-object", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("role-missing", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("role-unknown", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content-number", CHAT, user(5), 400, "messages[0].content"),
    ("content-object", CHAT, user({"text": "hi"}), 400, "messages[0].content"),
    ("part-without-type", CHAT, user([{"text": "hi"}]), 400, "messages[0].content[0]"),
    (
        "part-unknown-type",
        CHAT,
        user([{"type": "video_url", "video_url": "x"}]),
        400,
        "messages[0].content[0]",
    ),
    ("text-part-without-text", CHAT, user([{"type": "text"}]), 400, "messages[0].content[0].text"),
    ("text-part-number", CHAT, user([{"type": "text", "text": 5}]), 400, "messages[0].content[0].text"),
    (
        "image-part-without-image_url",
        CHAT,
        user([{"type": "image_url"}]),
        400,
        "messages[0].content[0].image_url",
    ),
    ("image_url-without-url", CHAT, image({}), 400, "messages[0].content[1].image_url.url"),
    ("image_url-number", CHAT, image(5), 400, "messages[0].content[1].image_url"),
    ("image_url-url-number", CHAT, image({"url": 5}), 400, "messages[0].content[1].image_url.url"),
    ("special-token-in-text", CHAT, user("look: <image>"), 400, "messages"),
    ("prompt-missing", COMPLETIONS, {"max_tokens": 5}, 400, "prompt"),
    ("prompt-token-list", COMPLETIONS, completion(prompt=[1, 2, 3]), 400, "prompt"),
    ("urls-not-list", COMPLETIONS, completion(urls="http://x"), 400, "urls"),
    # ---- text encodings: lone surrogates anywhere --------------------------------------------------
    ("surrogate-message", CHAT, user("hi " + SURROGATE), 400, "messages[0].content"),
    (
        "surrogate-text-part",
        CHAT,
        user([{"type": "text", "text": SURROGATE}]),
        400,
        "messages[0].content[0].text",
    ),
    ("surrogate-prompt", COMPLETIONS, completion(prompt="a\udc00b"), 400, "prompt"),
    ("surrogate-model", CHAT, chat(model="m" + SURROGATE), 400, "model"),
    (
        "surrogate-image-url",
        CHAT,
        image({"url": "http://example.com/" + SURROGATE}),
        400,
        "messages[0].content[1].image_url.url",
    ),
    (
        "surrogate-image-url-string",
        CHAT,
        image("data:image/png;base64," + SURROGATE),
        400,
        "messages[0].content[1].image_url",
    ),
    ("surrogate-urls", COMPLETIONS, completion(prompt="<image>", urls=[SURROGATE]), 400, "urls[0]"),
    ("surrogate-stop", CHAT, chat(stop=SURROGATE), 400, "stop"),
    ("surrogate-stop-list", CHAT, chat(stop=["ok", SURROGATE]), 400, "stop[1]"),
    (
        "surrogate-template-kwargs",
        CHAT,
        chat(chat_template_kwargs={"x": [SURROGATE]}),
        400,
        "chat_template_kwargs",
    ),
    ("surrogate-key-echoed", CHAT, chat(mm_processor_kwargs={SURROGATE: 1}), 400, "mm_processor_kwargs"),
    (
        "utf8-encoded-surrogate-bytes",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        400,
        "messages[0].content",
    ),
    # ---- context length ---------------------------------------------------------------------------
    ("max_tokens-over-context", CHAT, chat(max_tokens=MAX_MODEL_LEN + 1), 400, "max_tokens"),
    (
        "max_completion_tokens-over-context",
        CHAT,
        chat(max_completion_tokens=10**20),
        400,
        "max_completion_tokens",
    ),
    ("prompt-over-context", COMPLETIONS, completion(prompt="hello " * MAX_MODEL_LEN), 400, "prompt"),
    ("messages-over-context", CHAT, user("hello " * MAX_MODEL_LEN), 400, "messages"),
    # ---- model and routes -------------------------------------------------------------------------
    ("unknown-model", CHAT, chat(model="gpt-4"), 404, "model"),
    ("unknown-route", "/v1/nope", chat(), 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_request_is_an_openai_4xx_naming_the_field(http, llm, path, body, status, param):
    assert_openai_error(send(http, path, body), status, param)
    assert_still_serving(http, llm)


def test_the_corpus_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_refused(http, llm, content_type):
    assert_openai_error(send(http, CHAT, chat(), content_type=content_type), 400, None)
    assert_still_serving(http, llm)


def test_unknown_model_is_openai_shaped_with_its_code(http):
    error = assert_openai_error(send(http, CHAT, chat(model="gpt-4")), 404, "model")
    assert error["code"] == "model_not_found" and "gpt-4" in error["message"]


def test_context_length_errors_have_their_code(http):
    for body in (chat(max_tokens=MAX_MODEL_LEN), completion(prompt="hello " * MAX_MODEL_LEN)):
        response = send(http, CHAT if "messages" in body else COMPLETIONS, body)
        assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("value", [1, 1.0, 0, 2, 0.5])
def test_float_fields_take_json_integers_and_decimals(http, llm, value):
    llm.answer = "ok"
    response = send(
        http, CHAT, chat(temperature=value, presence_penalty=value / 2, repetition_penalty=value or 1)
    )
    assert response.status_code == 200, response.text
    sampling = llm.requests[-1].sampling
    assert sampling.temperature == pytest.approx(value) and sampling.presence_penalty == pytest.approx(
        value / 2
    )


def test_valid_edges_are_accepted(http, llm):
    llm.answer = "ok"
    for body in (
        chat(top_p=1, top_k=-1, min_p=0, seed=2**64 - 1, stop=[str(i) for i in range(16)], n=1),
        chat(seed=-(2**63), stream=False, logprobs=True, top_logprobs=20, repetition_penalty=0.01),
        user([{"type": "text", "text": "naïve café 😀 图片"}]),
    ):
        assert send(http, CHAT, body).status_code == 200
    assert send(http, COMPLETIONS, completion(logprobs=0, max_tokens=1)).status_code == 200


def test_an_echoed_lone_surrogate_is_escaped_not_fatal(http):
    error = assert_openai_error(
        send(http, CHAT, chat(mm_processor_kwargs={"x" + SURROGATE: 1})), 400, "mm_processor_kwargs"
    )
    assert SURROGATE not in json.dumps(error, ensure_ascii=False)


# ---- work before limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, completion(prompt="x" * (30 * 1024 * 1024)), "prompt"),
        (CHAT, user("x" * (30 * 1024 * 1024)), "messages"),
        # just over the byte bound, in multi-byte characters (fewer characters than bytes)
        (COMPLETIONS, completion(prompt="é" * (MAX_MODEL_LEN * MAX_BYTES_PER_TOKEN // 2 + 1)), "prompt"),
    ],
    ids=["30MB-prompt", "30MB-message", "over-the-byte-bound"],
)
def test_a_huge_prompt_is_refused_without_tokenizing(http, llm, path, body, param):
    error = assert_openai_error(send(http, path, body), 400, param)
    assert error["code"] == "context_length_exceeded"
    assert llm.prompt.tokenized == 0
    assert_still_serving(http, llm)
    assert llm.prompt.tokenized == 1


def test_a_prompt_under_the_byte_bound_is_tokenized(http, llm):
    """The bound refuses only prompts that cannot fit; the exact check comes after tokenizing."""
    prompt = " " * (MAX_MODEL_LEN * MAX_BYTES_PER_TOKEN // 2)
    response = send(http, COMPLETIONS, completion(prompt=prompt))
    assert llm.prompt.tokenized == 1
    assert response.status_code in (200, 400)


def test_a_declared_content_length_over_the_limit_is_413(llm):
    with TestClient(make_app(llm, max_request_bytes=1000)) as client:
        response = send(client, CHAT, user("x" * 2000))
        assert_openai_error(response, 413, None)
        assert "1000 byte limit" in response.json()["error"]["message"]
        assert_still_serving(client, llm)


def test_a_chunked_70MB_body_is_413_without_reading_it_all(app, llm):
    """No Content-Length: the limit (64 MiB by default) is found while reading, and the rest is left unread."""
    chunk = b"x" * (1024 * 1024)
    sent = 0

    async def body():
        nonlocal sent
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(70):
            sent += 1
            yield chunk
        yield b'"}]}'

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.post(CHAT, content=body(), headers={"content-type": "application/json"})
            assert "content-length" not in response.request.headers
            return response

    response = asyncio.run(go())
    assert_openai_error(response, 413, None)
    assert sent < 70
    with TestClient(app) as client:
        assert_still_serving(client, llm)


# ---- metrics ------------------------------------------------------------------------------------------


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
            opened = await asyncio.to_thread(self.gate.wait, 60)
            assert opened, "the test never opened the gate"
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
