"""Request bodies: the sampling fields' ranges, and how every entry point's fields map onto SamplingParams."""

import dataclasses

import pytest
from pydantic import ValidationError

from gateway.http.generation import settings_from_body
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from mmserve.proto import llm_pb2
from mmserve.sampling import GenerationDefaults, SamplingParams
from mmserve.wire_pb import sampling_from_pb, sampling_to_pb
from pipeline.settings import settings_from_generate_config

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **fields)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt="hi", **fields)


def sampling_params(body, defaults: GenerationDefaults) -> SamplingParams:
    """What the REST entry point's settings builder makes of `body`'s sampling fields."""
    return settings_from_body(body, defaults).sampling


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


def test_n_is_1_to_16_choices():
    assert chat().choices == 1
    assert chat(n=16).choices == 16
    for bad in (0, 17, -1):
        with pytest.raises(ValidationError, match="n"):
            chat(n=bad)


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


# ---- one settings builder for REST, the Python API and gRPC ------------------------------------


def test_the_three_entry_points_build_the_same_settings():
    """The same choices through REST's body, the Python API's generate_config and the gRPC message
    come out as the same engine settings (the checkpoint's defaults filling what is unset)."""
    defaults = GenerationDefaults(temperature=0.5, repetition_penalty=1.25, top_k=7)  # exact in float32
    rest = settings_from_body(completion(top_p=0.75, top_k=-1, min_tokens=2, seed=5, max_tokens=9), defaults)
    python = settings_from_generate_config(
        {"top_p": 0.75, "top_k": -1, "min_new_tokens": 2, "seed": 5, "max_new_tokens": 9}, defaults
    )
    assert rest == python
    sampling = rest.sampling
    assert (sampling.temperature, sampling.repetition_penalty, sampling.top_k) == (0.5, 1.25, 0)
    sent = dataclasses.replace(rest.sampling, max_new_tokens=9)
    assert sampling_from_pb(sampling_to_pb(sent)) == sent


def test_grpc_zeros_mean_neutral_where_zero_is_meaningless():
    """proto3 cannot send 'unset': a top_p or repetition_penalty of 0 is the neutral 1.0."""
    params = sampling_from_pb(llm_pb2.SamplingParams(temperature=0.0, max_new_tokens=4))
    assert params == SamplingParams(temperature=0.0, max_new_tokens=4)


def test_settings_are_frozen():
    settings = settings_from_body(chat(), GenerationDefaults())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sampling.max_new_tokens = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_tokens = 5  # type: ignore[misc]


# ---- strict types, finite numbers, encodable text ----------------------------------------------


@pytest.mark.parametrize(
    "fields,field_name",
    [
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": float("-inf")}, "presence_penalty"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 1.0}, "max_tokens"),  # integer fields take JSON integers only
        ({"top_k": 2**31}, "top_k"),  # int32 on the wire
        ({"min_tokens": True}, "min_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"n": 0}, "n"),
        ({"n": 2.0}, "n"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"model": "m\ud800"}, "model"),
    ],
)
def test_no_coercion_and_the_field_is_named(fields, field_name):
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    assert error_fields(exc) == [field_name]


@pytest.mark.parametrize("value", [1, 1.0, 0, 2, 0.25])
def test_float_fields_take_integers_and_decimals(value):
    body = chat(temperature=value, top_p=max(value, 0.5) if value <= 1 else 1, frequency_penalty=value)
    assert body.temperature == value and isinstance(body.temperature, float)


def test_union_errors_name_the_member_field_without_tags():
    with pytest.raises(ValidationError) as exc:
        chat(stop=["a", 1])
    assert error_fields(exc) == ["stop.<list>.1"]  # gateway.http.errors drops the tag: stop[1]
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "audio"}]}])
    assert [e["msg"] for e in exc.value.errors()] == ["a content part's type must be 'text' or 'image_url'"]


@pytest.mark.parametrize(
    "content",
    [
        "\ud800",
        [{"type": "text", "text": "a\udfffb"}],
        [{"type": "image_url", "image_url": {"url": "http://x/\ud800"}}],
        [{"type": "image_url", "image_url": "\udc80"}],
    ],
)
def test_lone_surrogates_are_refused_everywhere(content):
    with pytest.raises(ValidationError, match="not valid UTF-8 text"):
        ChatCompletionRequest(messages=[{"role": "user", "content": content}])
    with pytest.raises(ValidationError, match="not valid UTF-8 text"):
        chat(chat_template_kwargs={"k": {"nested": ["\ud800"]}})
    with pytest.raises(ValidationError, match="not valid UTF-8 text"):
        completion(urls=["\ud800"])
    assert chat(stop="naïve 😀").stop_list == ["naïve 😀"]  # real non-ASCII text is fine


def test_token_limit_field_names_what_the_client_sent():
    assert chat().token_limit_field == "max_tokens"
    assert chat(max_completion_tokens=5).token_limit_field == "max_completion_tokens"
    assert completion().token_limit_field == "max_tokens"
