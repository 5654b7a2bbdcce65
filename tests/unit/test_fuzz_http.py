"""Property-based fuzzing of the HTTP edge: `/v1/chat/completions` and `/v1/completions` of the real FastAPI
app in process: a ServingCore over test_api.py's scripted LLM, as test_bad_input.py builds it, plus the real
chat template code (the demo llava template) and a fake vision client, so image parts get as far as the LLM.

Bodies are schema-shaped (each field absent, valid, or any JSON value: huge, negative and non-finite
numbers, lone surrogates, nesting, unknown fields, empty and huge strings, content parts of the wrong
type) or raw bytes (truncated and mutated JSON, deep nesting, huge literals, invalid UTF-8). Every
response must be a 200 that is well-formed JSON / SSE, or a 4xx in OpenAI's error shape; never a 5xx.
After the run a normal request still succeeds. Bounded and derandomized, so CI runs the same examples.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.chat_template import RESERVED_TEMPLATE_KWARGS, ChatTemplate
from gateway.config import MediaConfig
from gateway.http.app import create_app
from gateway.media import MediaFetcher
from gateway.serving import ServingCore
from mmserve.wire import ImageFeatures
from tests.fuzz_settings import fuzz_settings
from tests.helpers import data_url, make_image
from tests.unit.test_api import MODEL, FakePrompt, ScriptedLLM
from tests.unit.test_bad_input import CHAT, COMPLETIONS, assert_still_serving, send
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


# ---- what a response may be ---------------------------------------------------------------------------


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
    assert choice["index"] == 0
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


def check_ok(response, path: str) -> None:
    chat = path == CHAT
    kind = response.headers["content-type"]
    if kind.startswith("text/event-stream"):
        lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "[DONE]", response.text
        chunks = [strict_json(line) for line in lines[:-1]]
        assert chunks
        for chunk in chunks:
            assert "error" not in chunk, chunk
            assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion"), chunk
            assert chunk["model"] == MODEL and isinstance(chunk["id"], str)
            for choice in chunk["choices"]:
                check_choice(choice, chat, stream=True)
            if not chunk["choices"]:
                check_usage(chunk["usage"])
        assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks), chunks
        return
    assert kind.startswith("application/json"), kind
    body = strict_json(response.text)
    assert body["object"] == ("chat.completion" if chat else "text_completion"), body
    assert body["model"] == MODEL and isinstance(body["id"], str)
    assert len(body["choices"]) == 1
    check_choice(body["choices"][0], chat, stream=False)
    check_usage(body["usage"])
    if "prompt_token_ids" in body:
        assert all(isinstance(t, int) for t in body["prompt_token_ids"])


def check(response, path: str) -> None:
    """The property; records the outcome (see --hypothesis-show-statistics) when inside a test."""
    status = response.status_code
    if status != 200 and response.headers.get("content-type", "").startswith("application/json"):
        event(f"{status} {response.json().get('error', {}).get('param')}")
    else:
        event(str(status))
    assert status < 500, (status, response.text)
    if status == 200:
        check_ok(response, path)
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
    assert body.get("n") in (None, 1), body["n"]
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


def fuzz_one(harness, path: str, body) -> None:
    """Send `body` (a JSON value, or raw bytes); check the response, and for a 200 what reached the LLM."""
    http, llm, _ = harness
    before = len(llm.requests)
    response = send(http, path, body if isinstance(body, bytes) else encode(body))
    check(response, path)
    if response.status_code == 200:
        assert len(llm.requests) == before + 1
        if not isinstance(body, bytes):
            check_accepted(body, path, llm.requests[-1].sampling)


# ---- strategies: JSON values ---------------------------------------------------------------------------

SPECIAL_STRINGS = [
    "",
    " ",
    "<image>",
    "<img/>",
    "</s>",
    "<s>",
    "\x00",
    "\ud800",
    "a\udc00b",
    "\udfff\ud800",
    "\ufeff",
    "\u2028",
    "😀 naïve 图片",
    "x" * 5000,
]
# Huge strings are drawn only where a prompt goes (and by index, so that generating them is cheap).
HUGE_STRINGS = ["x" * 600_000, "é" * 300_000, "hello " * 5000]  # over the byte bound; over the context
TEXT = st.one_of(
    st.text(max_size=20),
    # lone surrogates, controls, private use, unassigned: anything json.dumps can write (as \u escapes)
    st.text(
        st.characters(codec=None, categories=["Cs", "Cc", "Co", "Cn", "L", "N", "P", "S", "Z"]), max_size=8
    ),
    st.sampled_from(SPECIAL_STRINGS),
)
PROMPT_TEXT = st.one_of(TEXT, st.integers(0, len(HUGE_STRINGS) - 1).map(HUGE_STRINGS.__getitem__))
KEYS = st.text(max_size=8) | st.sampled_from(["\ud800", "", "messages", "__proto__", "type"])
EDGE_INTS = [
    0,
    1,
    -1,
    2,
    2**31 - 1,
    2**31,
    -(2**31),
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**30,
    -(10**30),
]
INTS = st.one_of(
    st.integers(), st.sampled_from(EDGE_INTS), st.integers(min_value=-(10**300), max_value=10**300)
)
FLOATS = st.one_of(
    st.floats(),  # NaN and +-inf included: json.dumps writes them as NaN / Infinity literals
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, 1.7976931348623157e308, 2.0000001, 1e-5]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def raw_json_text(draw) -> str:
    """JSON text json.dumps will not write: deep nesting, integers over Python's 4300-digit limit, a float
    literal that overflows to infinity."""
    kind = draw(st.sampled_from(["nest", "nest", "bigint", "bigfloat"]))
    if kind == "bigint":
        return "9" * draw(st.sampled_from([4301, 20_000]))
    if kind == "bigfloat":
        return "1" + "0" * 400 + ".5e99999"
    depth = draw(st.sampled_from([100, 1000, 10_000, 200_000]))
    open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return open_ * depth + "0" + close * depth


class Raw(str):
    """A value `encode` writes as this JSON text, verbatim."""


ABSENT = object()


@st.composite
def _weighted(draw, choices: list[str], valid, hostile):
    choice = draw(st.sampled_from(choices))
    if choice == "absent":
        return ABSENT
    return draw(valid if choice == "valid" else hostile)


def field(valid, hostile=JSON, absent: int = 20, valid_weight: int = 6, hostile_weight: int = 1):
    """Absent, a valid value, or any JSON value, by these weights."""
    # valid first: the simplest example (what Hypothesis starts from and shrinks towards) is a valid body
    return _weighted(
        ["valid"] * valid_weight + ["absent"] * absent + ["hostile"] * hostile_weight, valid, hostile
    )


def build(draw, fields: dict, raw: bool = False) -> dict:
    """An object of the present fields; now and then unknown fields, or (`raw`) one field set to raw JSON
    text."""
    out = {}
    for name, strategy in fields.items():
        value = draw(strategy)
        if value is not ABSENT:
            out[name] = value
    extra = draw(st.integers(0, 19))
    if extra < 3:
        for key, value in draw(st.dictionaries(KEYS, JSON, max_size=3)).items():
            out.setdefault(key, value)
    elif extra == 3 and raw:
        out[draw(st.sampled_from([*fields, "unknown"]))] = Raw(draw(raw_json_text()))
    return out


# ---- strategies: request bodies ------------------------------------------------------------------------

PNG = data_url(make_image(4, 4, seed=7))
URLS = st.one_of(
    st.just(PNG),
    st.sampled_from(
        [
            PNG,
            "data:image/png;base64,",
            "data:image/png;base64,!!!!",
            "data:image/png;base64,aGVsbG8=",  # decodes, but is no image
            "data:text/plain;base64,aGVsbG8=",
            "data:image/png,raw",
            "data:,",
            "data:image/png;base64," + "A" * 100_000,
            "http://127.0.0.1:1/x.png",  # loopback: refused by the media policy
            "http://localhost/x.png",
            "https://[::1]/x.png",
            "http://[zz/x",
            "http://127.0.0.1:99999/x",
            "http://",
            "file:///etc/passwd",
            "/etc/passwd",
            "ftp://127.0.0.1/x",
            "",
        ]
    ),
    TEXT,
)
# A number field's hostile values: any JSON value, or a number's near misses
HOSTILE_NUMBER = st.one_of(
    JSON,
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            1e308,
            -1e-308,
            -1,
            0,
            1.5,
            2**31,
            2**64,
            "0.5",
            "1",
            True,
            False,
            [],
            {},
        ]
    ),
)
PLAIN = st.text(max_size=20)  # valid text (a special token or a lone surrogate in it is unlikely)
HOSTILE_TEXT = st.one_of(JSON, TEXT)
SAMPLING = {
    "model": field(st.sampled_from([MODEL, MODEL, MODEL, "gpt-4", ""]), HOSTILE_TEXT),
    "temperature": field(st.floats(0, 2), HOSTILE_NUMBER),
    "top_p": field(st.floats(0, 1, exclude_min=True), HOSTILE_NUMBER),
    "top_k": field(st.integers(-1, 100), HOSTILE_NUMBER),
    "max_tokens": field(st.integers(1, 50), HOSTILE_NUMBER),
    "min_tokens": field(st.integers(0, 5), HOSTILE_NUMBER),
    "seed": field(st.integers(-(2**63), 2**64 - 1), HOSTILE_NUMBER),
    "stop": field(
        st.one_of(PLAIN, st.lists(PLAIN, max_size=16)),
        st.one_of(JSON, TEXT, st.lists(TEXT, max_size=17), st.lists(JSON, min_size=1, max_size=3)),
    ),
    "ignore_eos": field(st.booleans()),
    "repetition_penalty": field(st.floats(0, 10, exclude_min=True), HOSTILE_NUMBER),
    "presence_penalty": field(st.floats(-2, 2), HOSTILE_NUMBER),
    "frequency_penalty": field(st.floats(-2, 2), HOSTILE_NUMBER),
    "min_p": field(st.floats(0, 1), HOSTILE_NUMBER),
    "n": field(st.just(1)),
    "stream": field(st.booleans(), valid_weight=8),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "return_token_ids": field(st.booleans()),
    "mm_processor_kwargs": field(
        st.fixed_dictionaries(
            {}, optional={"min_pixels": st.integers(1, 10**6), "max_pixels": st.integers(1, 10**6)}
        )
    ),
}


IMAGE_URL_FIELDS = {"url": field(URLS, absent=1, valid_weight=20), "detail": field(PLAIN, HOSTILE_TEXT)}
TEXT_PART_FIELDS = {
    "type": field(st.just("text"), absent=1, valid_weight=20),
    "text": field(PLAIN, st.one_of(HOSTILE_TEXT, PROMPT_TEXT), absent=1, valid_weight=12, hostile_weight=2),
}
OTHER_PARTS = st.one_of(
    JSON,
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["video_url", "input_audio", "Text"]), JSON)}),
)


@st.composite
def fields(draw, spec: dict, raw: bool = False) -> dict:
    return build(draw, spec, raw)


IMAGE_PART_FIELDS = {
    "type": field(st.just("image_url"), absent=1, valid_weight=20),
    "image_url": field(st.one_of(URLS, fields(IMAGE_URL_FIELDS)), absent=1, valid_weight=12),
}
TEXT_PART, IMAGE_PART = fields(TEXT_PART_FIELDS), fields(IMAGE_PART_FIELDS)
CONTENT_PART = st.sampled_from([TEXT_PART, IMAGE_PART, TEXT_PART, IMAGE_PART, OTHER_PARTS]).flatmap(
    lambda s: s
)
MESSAGE_FIELDS = {
    "role": field(st.sampled_from(["user", "system", "assistant", "developer"]), absent=1, valid_weight=20),
    "content": field(
        st.one_of(PLAIN, st.lists(CONTENT_PART, max_size=3), st.none()),
        st.one_of(HOSTILE_TEXT, PROMPT_TEXT),
        absent=1,
        valid_weight=12,
        hostile_weight=2,
    ),
    "name": field(PLAIN, HOSTILE_TEXT),
}
# apply_chat_template's own parameters (reserved: a 400; tools / documents: checked by transformers) and
# names the template itself uses
TEMPLATE_KEYS = st.sampled_from(
    [
        *sorted(RESERVED_TEMPLATE_KWARGS),
        "tools",
        "documents",
        "self",
        "kwargs",
        "bos_token",
        "raise_exception",
    ]
)
CHAT_FIELDS = {
    "messages": field(st.lists(fields(MESSAGE_FIELDS), min_size=1, max_size=3), absent=1, valid_weight=30),
    **SAMPLING,
    "max_completion_tokens": field(st.integers(1, 50), HOSTILE_NUMBER),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(0, 20), HOSTILE_NUMBER),
    "chat_template_kwargs": field(
        st.dictionaries(st.one_of(st.text(max_size=8), TEMPLATE_KEYS), JSON, max_size=3)
    ),
}
COMPLETION_FIELDS = {**SAMPLING, "logprobs": field(st.integers(0, 20), HOSTILE_NUMBER)}


@st.composite
def chat_object(draw):
    body = build(draw, CHAT_FIELDS, raw=True)
    if "top_logprobs" in body and "logprobs" not in body and draw(st.integers(0, 4)):
        body["logprobs"] = True  # top_logprobs needs it
    return body


CHAT_BODY = _weighted(["valid"] * 19 + ["hostile"], chat_object(), JSON)


@st.composite
def completion_body(draw):
    """Mostly a prompt with as many `<image>` tags as urls; now and then a mismatch or hostile values."""
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)  # not an object at all (or an arbitrary one)
    body = build(draw, COMPLETION_FIELDS, raw=True)
    urls = draw(st.lists(URLS, max_size=3))
    parts = draw(st.lists(PLAIN, min_size=len(urls) + 1, max_size=len(urls) + 1))
    prompt = "<image>".join(parts)
    shape = draw(
        st.sampled_from(["matched"] * 12 + ["no urls", "mismatch", "hostile prompt", "hostile urls"])
    )
    if shape == "no urls":
        urls = None
    elif shape == "mismatch":
        prompt += draw(st.sampled_from(["<image>", "<img/>", ""]))
        urls = urls + draw(st.lists(URLS, max_size=2))
    elif shape == "hostile prompt":
        prompt = draw(st.one_of(HOSTILE_TEXT, PROMPT_TEXT, st.just(ABSENT)))
    elif shape == "hostile urls":
        urls = draw(st.one_of(JSON, st.lists(st.one_of(URLS, JSON), max_size=5)))
    for key, value in (("prompt", prompt), ("urls", urls)):
        if value is not None and value is not ABSENT:
            body.setdefault(key, value)
    return body


COMPLETION_BODY = completion_body()


def encode(body) -> bytes:
    """json.dumps (lone surrogates as \\u escapes, NaN / Infinity as literals), Raw values verbatim."""
    raws: list[str] = []

    def swap(value):
        if isinstance(value, Raw):
            raws.append(str(value))
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(body))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw)
    return text.encode()


# ---- strategies: raw bytes ------------------------------------------------------------------------------

VALID = [
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode(),
    json.dumps({"prompt": "hi <image>", "urls": [PNG], "max_tokens": 3, "stream": True}).encode(),
]


@st.composite
def raw_body(draw) -> bytes:
    base = draw(st.sampled_from(VALID))
    kind = draw(st.sampled_from(["binary", "truncate", "flip", "insert", "encode", "framing"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base)))]
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "insert":
        at = draw(st.integers(0, len(base)))
        junk = draw(
            st.one_of(
                st.binary(min_size=1, max_size=8),
                st.sampled_from(
                    [b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\x80", b"\\ud800", b"\\u0000", b"NaN", b"-Infinity"]
                ),
            )
        )
        return base[:at] + junk + base[at:]
    if kind == "encode":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1"]))
        return base.decode().encode(codec)
    prefix, suffix = draw(
        st.sampled_from(
            [
                (b"", b"garbage"),
                (b"  \n\t", b"  "),
                (b"[", b"]"),
                (b'{"messages": ', b"}"),
                (b"", base),  # two bodies back to back
            ]
        )
    )
    return prefix + base + suffix


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "APPLICATION/JSON",
        "application/vnd.api+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ]
)


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
