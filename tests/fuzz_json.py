"""Hypothesis strategies of JSON values for fuzzing (special and huge strings, edge integers, non-finite
floats, nesting, raw JSON text json.dumps will not write), the field / object builders over them, and
`encode`, which writes a drawn body as the bytes a client would send."""

from __future__ import annotations

import json

from hypothesis import strategies as st

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
def weighted(draw, choices: list[str], valid, hostile):
    choice = draw(st.sampled_from(choices))
    if choice == "absent":
        return ABSENT
    return draw(valid if choice == "valid" else hostile)


def field(valid, hostile=JSON, absent: int = 20, valid_weight: int = 6, hostile_weight: int = 1):
    """Absent, a valid value, or any JSON value, by these weights."""
    # valid first: the simplest example (what Hypothesis starts from and shrinks towards) is a valid body
    return weighted(
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
