"""Hostile and malformed requests against the real FastAPI app (a ServingCore over a scripted LLM; fixtures
in tests/unit/conftest.py): each gets a 4xx in OpenAI's error shape naming the field at fault, no work is
done before the limits, and the app answers a normal request afterwards."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.serving import MAX_BYTES_PER_TOKEN
from tests.bad_input_cases import CASES, SURROGATE, completion
from tests.gateway_app import (
    CHAT,
    COMPLETIONS,
    MAX_MODEL_LEN,
    assert_still_serving,
    chat,
    make_app,
    send,
    user,
)


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
