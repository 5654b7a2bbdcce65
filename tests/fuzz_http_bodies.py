"""Hypothesis strategies of request bodies for `/v1/chat/completions` and `/v1/completions`: schema-shaped
(each field absent, valid, or any JSON value), and raw bytes (truncated and mutated JSON, other
encodings, framing), with the content types they are sent under."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

from gateway.chat_template import RESERVED_TEMPLATE_KWARGS
from tests.fuzz_json import ABSENT, JSON, PROMPT_TEXT, TEXT, build, field, weighted
from tests.helpers import data_url, make_image
from tests.unit.test_api import MODEL

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
# JSON schemas: usable ones, ones the compiler refuses, and recursive / combinator shapes
SCHEMAS = st.one_of(
    st.sampled_from(
        [
            {"type": "object"},
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"type": "string", "pattern": "^a+$"},
            {"enum": [1, "a", None]},
            {"type": "nope"},
            {"$ref": "#/definitions/missing"},
            {"type": "array", "items": {"$ref": "#"}},
            {"anyOf": [{"type": "string"}, {"type": "number"}]},
            {"not": {}},
            {},
            {"type": "object", "x-guidance": {"whitespace_flexible": True}},
        ]
    ),
    st.dictionaries(TEXT, JSON, max_size=3),
)
RESPONSE_FORMAT = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    st.fixed_dictionaries(
        {"type": st.just("json_schema")},
        optional={
            "json_schema": st.fixed_dictionaries(
                {}, optional={"name": PLAIN, "schema": SCHEMAS, "strict": st.booleans()}
            )
        },
    ),
)
REGEXES = st.one_of(st.sampled_from(["a+", "[0-9]{2}", "(", "a{99999}", ".*", "(?=a)", ""]), TEXT)
STRUCTURED_OUTPUTS = st.one_of(
    st.fixed_dictionaries({"regex": REGEXES}),
    st.fixed_dictionaries({"choice": st.lists(PLAIN, min_size=0, max_size=3)}),
    st.fixed_dictionaries(
        {"grammar": st.one_of(st.sampled_from(['start: "a"', "start: x", "", "%%"]), TEXT)}
    ),
    st.fixed_dictionaries({"json": SCHEMAS}),
    st.fixed_dictionaries({"json_object": st.booleans()}),
    st.fixed_dictionaries({}, optional={"regex": REGEXES, "json": SCHEMAS}),
)
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
    "n": field(st.integers(1, 3), HOSTILE_NUMBER),
    "stream": field(st.booleans(), valid_weight=8),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "return_token_ids": field(st.booleans()),
    "logit_bias": field(
        st.dictionaries(st.integers(0, 2**31 - 1).map(str), st.floats(-100, 100), max_size=4),
        st.one_of(JSON, st.dictionaries(TEXT, HOSTILE_NUMBER, max_size=3)),
    ),
    "stop_token_ids": field(
        st.lists(st.integers(0, 2**31 - 1), max_size=4), st.one_of(JSON, st.lists(HOSTILE_NUMBER, max_size=3))
    ),
    "response_format": field(RESPONSE_FORMAT),
    "structured_outputs": field(STRUCTURED_OUTPUTS, absent=30),
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


CHAT_BODY = weighted(["valid"] * 19 + ["hostile"], chat_object(), JSON)


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
