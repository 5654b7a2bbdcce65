"""What a response of the HTTP edge may be, for the fuzz tests: a 200 that is well-formed JSON / SSE, or a
4xx in OpenAI's error shape; and for a 200, that the body held only documented values and they reached
the LLM as sent."""

from __future__ import annotations

import json
import math

from hypothesis import event

from tests.gateway_app import CHAT
from tests.unit.test_api import MODEL


def _no_constants(name: str):
    raise AssertionError(f"response JSON holds {name}, which JSON has not")


def strict_json(text: str):
    return json.loads(text, parse_constant=_no_constants)


def check_error(response) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = strict_json(response.text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if error["param"] is not None:
        assert error["message"].startswith(error["param"] + ":"), error
    error["message"].encode("utf-8")  # encodable: an echoed lone surrogate was escaped


def check_usage(usage: dict) -> None:
    assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(usage), usage
    assert usage["prompt_tokens"] >= 1 and usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_choice(choice: dict, chat: bool, stream: bool) -> None:
    assert isinstance(choice["index"], int) and choice["index"] >= 0, choice
    assert choice["finish_reason"] in ((None, "stop", "length") if stream else ("stop", "length")), choice
    if chat and stream:
        assert isinstance(choice["delta"], dict)
        assert isinstance(choice["delta"].get("content", ""), str)
    elif chat:
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
    else:
        assert isinstance(choice["text"], str)
    logprobs = choice["logprobs"]
    if logprobs is not None and chat:
        for entry in logprobs["content"]:
            assert isinstance(entry["token"], str) and isinstance(entry["logprob"], float)
            assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    elif logprobs is not None:
        n = len(logprobs["tokens"])
        assert (
            len(logprobs["token_logprobs"])
            == len(logprobs["top_logprobs"])
            == len(logprobs["text_offset"])
            == n
        )
    if "token_ids" in choice:
        assert all(isinstance(t, int) for t in choice["token_ids"])


def check_ok(response, path: str, choices: int | None = None) -> None:
    """`choices`: how many the request asked for (None: any number, indexed from 0 without gaps)."""
    chat = path == CHAT
    kind = response.headers["content-type"]
    if kind.startswith("text/event-stream"):
        lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "[DONE]", response.text
        chunks = [strict_json(line) for line in lines[:-1]]
        assert chunks
        finished: list[int] = []
        for chunk in chunks:
            assert "error" not in chunk, chunk
            assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion"), chunk
            assert chunk["model"] == MODEL and isinstance(chunk["id"], str)
            for choice in chunk["choices"]:
                check_choice(choice, chat, stream=True)
                if choice["finish_reason"]:
                    finished.append(choice["index"])
            if not chunk["choices"]:
                check_usage(chunk["usage"])
        # every choice finishes once
        assert sorted(finished) == list(range(choices or len(finished))), (finished, chunks)
        return
    assert kind.startswith("application/json"), kind
    body = strict_json(response.text)
    assert body["object"] == ("chat.completion" if chat else "text_completion"), body
    assert body["model"] == MODEL and isinstance(body["id"], str)
    assert [c["index"] for c in body["choices"]] == list(range(choices or len(body["choices"]))), body
    for choice in body["choices"]:
        check_choice(choice, chat, stream=False)
    check_usage(body["usage"])
    if "prompt_token_ids" in body:
        assert all(isinstance(t, int) for t in body["prompt_token_ids"])


def check(response, path: str, choices: int | None = None) -> None:
    """The property; records the outcome (see --hypothesis-show-statistics) when inside a test."""
    status = response.status_code
    if status != 200 and response.headers.get("content-type", "").startswith("application/json"):
        event(f"{status} {response.json().get('error', {}).get('param')}")
    else:
        event(str(status))
    assert status < 500, (status, response.text)
    if status == 200:
        check_ok(response, path, choices)
    else:
        assert status in (400, 404, 413), (status, response.text)
        check_error(response)


def _number(value, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> bool:
    """`value` is a JSON number of the field's kind (booleans are not numbers) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (lo < value if lo_open else lo <= value) and value <= hi


INT32_MAX = 2**31 - 1
# The documented ranges (README, Sampling parameters) and what each field becomes in SamplingParams.
SAMPLING_CONTRACT = {
    "temperature": (lambda v: _number(v, 0, 2), "temperature", float),
    "top_p": (lambda v: _number(v, 0, 1, lo_open=True), "top_p", float),
    "top_k": (lambda v: _number(v, -1, INT32_MAX, integer=True), "top_k", lambda v: 0 if v == -1 else v),
    "min_p": (lambda v: _number(v, 0, 1), "min_p", float),
    "presence_penalty": (lambda v: _number(v, -2, 2), "presence_penalty", float),
    "frequency_penalty": (lambda v: _number(v, -2, 2), "frequency_penalty", float),
    "repetition_penalty": (lambda v: _number(v, 0, math.inf, lo_open=True), "repetition_penalty", float),
    "min_tokens": (lambda v: _number(v, 0, INT32_MAX, integer=True), "min_new_tokens", int),
    "seed": (lambda v: _number(v, -(2**63), 2**64 - 1, integer=True), "seed", lambda v: v % 2**64),
    "ignore_eos": (lambda v: isinstance(v, bool), "ignore_eos", bool),
}


def check_accepted(body, path: str, sampling) -> None:
    """A body that got a 200 holds only documented values, and they reached the LLM as sent."""
    assert isinstance(body, dict), body
    for name, (valid, attribute, convert) in SAMPLING_CONTRACT.items():
        if body.get(name) is not None:
            assert valid(body[name]), (name, body[name])
            assert getattr(sampling, attribute) == convert(body[name]), (name, body[name], sampling)
    for name in ("stream", "return_token_ids"):
        assert body.get(name) is None or isinstance(body[name], bool), (name, body[name])
    assert body.get("n") is None or _number(body["n"], 1, 16, integer=True), body["n"]
    stop = body.get("stop")
    assert stop is None or isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 16), stop
    assert body.get("model") in (None, "", MODEL), body["model"]
    limit = body.get("max_completion_tokens") if path == CHAT else None
    limit = body.get("max_tokens") if limit is None else limit
    if limit is not None:
        assert _number(limit, 1, 4096, integer=True) and sampling.max_new_tokens == limit, (limit, sampling)
    if path == CHAT:
        top = body.get("top_logprobs")
        assert top is None or (body.get("logprobs") is True and _number(top, 0, 20, integer=True)), top
        want = (top or 0) if body.get("logprobs") else None
    else:
        want = body.get("logprobs")
        assert want is None or _number(want, 0, 20, integer=True), want
    assert sampling.logprobs == want, (want, sampling)
    check_structured(body, sampling.structured)
    bias = body.get("logit_bias") or {}
    assert all(k.isascii() and k.isdigit() and _number(v, -100, 100) for k, v in bias.items()), bias
    assert sampling.logit_bias == tuple(sorted((int(k), float(v)) for k, v in bias.items())), (bias, sampling)
    stop_ids = body.get("stop_token_ids") or []
    assert all(_number(t, 0, INT32_MAX, integer=True) for t in stop_ids), stop_ids
    assert sampling.stop_token_ids == tuple(stop_ids), (stop_ids, sampling)


def check_structured(body: dict, structured) -> None:
    """What a 200 asked the output to match reached the LLM as asked (and both ways at once never do)."""
    fmt, guided = body.get("response_format"), body.get("structured_outputs")
    constrained = fmt is not None and fmt.get("type") != "text"
    assert not (constrained and guided is not None), body
    if guided is not None:
        ((kind, value),) = [(k, v) for k, v in guided.items() if v is not None and v is not False]
        if kind == "json":
            assert structured.kind == "json_schema" and json.loads(structured.spec) == value
        elif kind == "json_object":
            assert structured.kind == "json_schema" and json.loads(structured.spec) == {"type": "object"}
        elif kind == "choice":
            assert structured.kind == "regex" and value
        else:
            assert (structured.kind, structured.spec) == ("grammar" if kind == "grammar" else "regex", value)
    elif constrained:
        schema = (fmt.get("json_schema") or {}).get("schema", {}) if fmt["type"] == "json_schema" else None
        want = {"type": "object"} if fmt["type"] == "json_object" else schema
        assert structured.kind == "json_schema" and json.loads(structured.spec) == want, (fmt, structured)
    else:
        assert structured is None, (body, structured)
