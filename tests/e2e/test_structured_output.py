"""Structured output through the three-process stack with the official openai client: response_format
(json_object, json_schema) and vLLM's structured_outputs, with an image, whole and streamed, n choices;
what cannot be compiled is a 400 naming the field, and never reaches the engine."""

from __future__ import annotations

import json
import re

import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"enum": ["cat", "dog", "bird"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "seen": {"type": "boolean"},
    },
    "required": ["animal", "legs", "seen"],
    "additionalProperties": False,
}


def messages(served):
    _, http_base = served
    content = [
        {"type": "image_url", "image_url": {"url": f"{http_base}/a.png"}},
        {"type": "text", "text": "Describe the animal as JSON."},
    ]
    return [{"role": "user", "content": content}]


def model(client):
    return client.models.list().data[0].id


def check(value: dict) -> None:
    assert set(value) == {"animal", "legs", "seen"}, value
    assert value["animal"] in ("cat", "dog", "bird") and isinstance(value["seen"], bool)
    assert isinstance(value["legs"], int) and 0 <= value["legs"] <= 8


def test_json_schema_with_an_image_whole_streamed_and_n(client, served):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "animal", "schema": SCHEMA, "strict": True},
    }
    whole = client.chat.completions.create(
        model=model(client),
        messages=messages(served),
        temperature=0,
        max_tokens=60,
        response_format=response_format,
    )
    text = whole.choices[0].message.content
    check(json.loads(text))
    assert whole.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=model(client),
        messages=messages(served),
        temperature=0,
        max_tokens=60,
        response_format=response_format,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    sampled = client.chat.completions.create(
        model=model(client),
        messages=messages(served),
        temperature=1.2,
        seed=5,
        n=4,
        max_tokens=60,
        response_format=response_format,
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    for choice in sampled.choices:
        check(json.loads(choice.message.content))
        assert choice.finish_reason == "stop"


def test_json_object_and_vllm_structured_outputs(client, served):
    obj = client.chat.completions.create(
        model=model(client),
        messages=messages(served),
        temperature=0.8,
        seed=3,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":  # a random model may write a long object
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")
    choice = client.chat.completions.create(
        model=model(client),
        messages=messages(served),
        temperature=1.0,
        seed=11,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "not sure"]}},
    )
    assert choice.choices[0].message.content in ("yes", "no", "not sure")
    completion = client.completions.create(
        model=model(client),
        prompt="The code is ",
        max_tokens=20,
        temperature=1.0,
        seed=2,
        extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-[0-9]{4}"}},
    )
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{4}", completion.choices[0].text), completion.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
            "Invalid type: nope",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema object"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_object"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "the regex cannot be used"),
        ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs.grammar", "grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            None,
            "may not both constrain",
        ),
    ],
)
def test_a_constraint_that_cannot_be_compiled_is_a_400_naming_it(client, served, extra, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model(client), messages=messages(served), max_tokens=5, extra_body=extra
        )
    error = caught.value.body
    assert says in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    # the stack still serves
    ok = client.chat.completions.create(
        model=model(client), messages=messages(served), max_tokens=3, temperature=0
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
