"""Request bodies: the sampling fields' ranges, and how they map onto SamplingParams."""

import pytest
from pydantic import ValidationError

from gateway.api import sampling_params
from gateway.generation_defaults import GenerationDefaults
from gateway.protocol import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **fields)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt="hi", **fields)


def error_fields(exc: pytest.ExceptionInfo) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]


@pytest.mark.parametrize(
    "fields,field_name",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"logprobs": 3}, "logprobs"),  # chat's logprobs is a boolean
    ],
)
def test_chat_out_of_range_fields_are_named(fields, field_name):
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    assert error_fields(exc) == [field_name]


@pytest.mark.parametrize("logprobs", [None, False])
def test_top_logprobs_requires_logprobs(logprobs):
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs to be true") as exc:
        chat(top_logprobs=2, logprobs=logprobs)
    assert error_fields(exc) == ["top_logprobs"]


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({}, None),
        ({"logprobs": False}, None),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 0}, 0),
        ({"logprobs": True, "top_logprobs": 20}, 20),
    ],
)
def test_chat_logprobs_become_the_number_of_alternatives(fields, expected):
    assert chat(**fields).num_logprobs == expected
    assert sampling_params(chat(**fields), GenerationDefaults()).logprobs == expected


def test_completion_logprobs_is_the_number_of_alternatives():
    assert completion().num_logprobs is None
    assert completion(logprobs=0).num_logprobs == 0
    assert sampling_params(completion(logprobs=5), GenerationDefaults()).logprobs == 5
    with pytest.raises(ValidationError) as exc:
        completion(logprobs=21)
    assert error_fields(exc) == ["logprobs"]


def test_penalties_and_min_p_pass_through():
    params = sampling_params(
        chat(presence_penalty=-2, frequency_penalty=1.5, min_p=0.05, repetition_penalty=1.1, top_k=-1),
        GenerationDefaults(),
    )
    assert (params.presence_penalty, params.frequency_penalty, params.min_p) == (-2, 1.5, 0.05)
    assert (params.repetition_penalty, params.top_k) == (1.1, 0)
    defaults = sampling_params(completion(), GenerationDefaults())
    assert (defaults.presence_penalty, defaults.frequency_penalty, defaults.min_p, defaults.logprobs) == (
        0.0,
        0.0,
        0.0,
        None,
    )


def test_n_above_one_is_still_refused():
    with pytest.raises(ValidationError, match="n must be 1"):
        chat(n=2)


def test_unset_fields_take_the_checkpoints_generation_config(tmp_path):
    """vLLM's --generation-config auto: generation_config.json's values are defaults, the request wins."""
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": true, "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,'
        ' "temperature": 0.01, "top_k": 1, "top_p": 0.001, "max_new_tokens": 77}'
    )
    defaults = GenerationDefaults.from_checkpoint(str(tmp_path))
    assert defaults == GenerationDefaults(
        temperature=0.01, top_p=0.001, top_k=1, repetition_penalty=1.05, max_tokens=77
    )
    params = sampling_params(chat(), defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        0.01,
        0.001,
        1,
        1.05,
    )
    params = sampling_params(chat(temperature=0.7, top_k=-1, repetition_penalty=1.0, top_p=1.0), defaults)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 1.0, 0, 1.0)
    assert GenerationDefaults.from_checkpoint(str(tmp_path / "nothing-here")) == GenerationDefaults()
