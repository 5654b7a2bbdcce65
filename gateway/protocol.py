"""OpenAI-compatible request bodies, validated at the HTTP edge (pydantic lives only here).

This module is the one place that says what each request field may hold:

- Types are strict: no string is coerced to a number or a boolean (`"0.5"`, `"10"`, `"yes"` are 400s),
  booleans are not numbers, integer fields take JSON integers only (`1.5` and `1.0` are refused), float
  fields take JSON integers and decimals (`1` and `1.0`).
- Numbers are finite: Python's json parses the `NaN` / `Infinity` literals, and they are refused.
- Text is encodable: a string holding a lone surrogate (`"\\ud800"` in JSON) is refused naming its field,
  before it can reach a tokenizer, a regex or an error message.
- Unions (`stop`, message `content`, content parts, `image_url`) pick their member from the input's
  shape and report errors of that member only; their tags (`<list>`, `<text>`...) are not identifiers,
  so the HTTP error handler leaves them out of `param` (`messages[0].content[1].image_url.url`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.chat_input import json_strings
from gateway.chat_template import RESERVED_TEMPLATE_KWARGS
from mmserve.sampling import StructuredOutput
from mmserve.structured import any_json_object, choice_regex, json_schema

MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; vLLM's default cap)
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024  # logit_bias entries (the LLM service's bound)
MAX_STOP_TOKEN_IDS = 1024
MAX_GUIDED_CHOICES = 256  # structured_outputs.choice: alternatives
MAX_CHOICES = 16  # `n`: choices per request, each a sequence of its own in the LLM service
INT32_MAX = 2**31 - 1  # top_k and min_tokens travel as int32 (protos/llm.proto)
INT64_MAX = 2**63 - 1  # pixel bounds travel as int64 (protos/vision.proto)


def text_problem(value: str) -> str | None:
    """Why `value` is not text that can be encoded as UTF-8 (a lone surrogate), or None when it is.
    The reason names a position, never the offending text."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 text (a lone surrogate at character {exc.start})"
    return None


def _encodable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("invalid_text", problem)
    return value


# Every string field of a request: JSON text that decodes to a lone surrogate is refused here.
Text = Annotated[str, AfterValidator(_encodable)]


def _shape(*, string: str | None = None, array: str | None = None, obj: str | None = None):
    """A callable discriminator: the union member's tag from the input's JSON type (None: no member)."""

    def pick(value: Any) -> str | None:
        if isinstance(value, str):
            return string
        if isinstance(value, list):
            return array
        if isinstance(value, dict | BaseModel):
            return obj
        return None

    return pick


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do for forward compatibility.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ImageURL(_Body):
    url: Text
    detail: Text | None = None


ImageURLField = Annotated[
    Annotated[ImageURL, Tag("<object>")] | Annotated[Text, Tag("<str>")],
    Discriminator(
        _shape(string="<str>", obj="<object>"),
        custom_error_type="invalid_type",
        custom_error_message='must be an object {"url": ...} or a string',
    ),
]


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURLField

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


def _part_type(value: Any) -> str | None:
    """The content part's tag from its `type`: of a JSON object, or of a part already validated."""
    kind = value.type if isinstance(value, TextPart | ImagePart) else None
    if isinstance(value, dict):
        kind = value.get("type")
    return {"text": "<text>", "image_url": "<image_url>"}.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("<text>")] | Annotated[ImagePart, Tag("<image_url>")],
    Discriminator(
        _part_type,
        custom_error_type="invalid_content_part",
        custom_error_message="a content part's type must be 'text' or 'image_url'",
    ),
]

Content = Annotated[
    Annotated[Text, Tag("<str>")] | Annotated[list[ContentPart], Tag("<list>")],
    Discriminator(
        _shape(string="<str>", array="<list>"),
        custom_error_type="invalid_type",
        custom_error_message="must be a string or a list of content parts",
    ),
]

Stop = Annotated[
    Annotated[Text, Tag("<str>")] | Annotated[list[Text], Tag("<list>")],
    Discriminator(
        _shape(string="<str>", array="<list>"),
        custom_error_type="invalid_type",
        custom_error_message="must be a string or a list of strings",
    ),
]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Content | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: Text | None = Field(default=None, max_length=64)  # OpenAI requires one; vLLM, like us, not
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema: strict or not


class ResponseFormat(_Body):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", 'type "json_schema" needs a json_schema object')
        return self

    def constraint(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return any_json_object()
        if self.type == "json_schema" and self.json_schema is not None:
            schema = self.json_schema.schema_
            return json_schema(schema if schema is not None else {})
        return None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, a regex, a list of choices or a Lark
    grammar (or `json_object: true`)."""

    json_: dict[str, Any] | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_GUIDED_CHOICES)
    grammar: Text | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        named = [
            name
            for name, value in (
                ("json", self.json_),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object or None),
            )
            if value is not None
        ]
        if len(named) != 1:
            raise PydanticCustomError(
                "one_constraint",
                "set exactly one of json, regex, choice, grammar and json_object, got {got}",
                {"got": ", ".join(named) or "none"},
            )
        return self

    @property
    def param(self) -> str:
        """The request field holding the constraint."""
        for name, value in (("json", self.json_), ("regex", self.regex), ("choice", self.choice)):
            if value is not None:
                return f"structured_outputs.{name}"
        return "structured_outputs.grammar" if self.grammar is not None else "structured_outputs.json_object"

    def constraint(self) -> StructuredOutput:
        if self.json_ is not None:
            return json_schema(self.json_)
        if self.regex is not None:
            return StructuredOutput("regex", self.regex)
        if self.choice is not None:
            return choice_regex(self.choice)
        if self.grammar is not None:
            return StructuredOutput("grammar", self.grammar)
        return any_json_object()


class MMProcessorKwargs(BaseModel):
    """vLLM's `mm_processor_kwargs`, the keys this server honours (dynamic-resolution families only)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    min_pixels: int | None = Field(default=None, ge=1, le=INT64_MAX)
    max_pixels: int | None = Field(default=None, ge=1, le=INT64_MAX)


class SamplingFields(_Body):
    """Fields shared by chat and text completions, the extras benchmark tools send included."""

    model: Text | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    # No upper bound here: the context-length check after tokenizing names max_tokens when it is too big.
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: Stop | None = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # vLLM's extension: drop tokens less likely than min_p times the most likely one.
    min_p: float | None = Field(default=None, ge=0, le=1)
    # Choices generated from one prompt (its prefill shared through the prefix cache); strict: JSON integers
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extension: echo prompt and completion token ids in the response.
    return_token_ids: bool | None = None
    # vLLM's extension: image preprocessing options of this request (Qwen2-VL's min/max pixels).
    mm_processor_kwargs: MMProcessorKwargs | None = None
    # OpenAI's: {"token id": bias in [-100, 100]}, added to those tokens' logits before sampling.
    logit_bias: dict[str, float] | None = None
    # vLLM's extension: token ids that end the generation (finish_reason "stop"), besides the model's own.
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS
    )
    # Structured output: OpenAI's response_format, or vLLM's structured_outputs (not both).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_structured(self):
        if self.structured_outputs is not None and self.response_format is not None:
            if self.response_format.type != "text":
                raise PydanticCustomError(
                    "conflict", "response_format and structured_outputs may not both constrain the output"
                )
        return self

    @property
    def structured_param(self) -> str:
        """The request field an error about `structured` names."""
        if self.structured_outputs is not None:
            return self.structured_outputs.param
        fmt = self.response_format
        return (
            "response_format.json_schema.schema" if fmt and fmt.type == "json_schema" else "response_format"
        )

    @property
    def structured(self) -> StructuredOutput | None:
        """The output's constraint; None: free text."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        return None if self.response_format is None else self.response_format.constraint()

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise PydanticCustomError(
                "too_long",
                "at most {limit} entries, got {count}",
                {"limit": MAX_LOGIT_BIAS, "count": len(value)},
            )
        for key, bias in value.items():
            # canonical decimals only: "01" and "1" would be two entries for one token
            if not (key.isascii() and key.isdigit() and key == str(int(key)) and int(key) <= INT32_MAX):
                raise PydanticCustomError(
                    "invalid_key",
                    "keys are token ids (decimal integers >= 0), got '{key}'",
                    {"key": key[:32]},
                )
            if not -100 <= bias <= 100:
                raise PydanticCustomError(
                    "out_of_range",
                    "biases are in [-100, 100], got {bias} for token {key}",
                    {"bias": bias, "key": key},
                )
        return value

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise PydanticCustomError(
                "too_long",
                "at most {limit} stop strings, got {count}",
                {"limit": MAX_STOP_STRINGS, "count": len(value)},
            )
        return value

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token the LLM should return (SamplingParams.logprobs); None: no logprobs."""
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's extension: extra variables for the chat template (e.g. Qwen2-VL's {"add_vision_id": true}).
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_clash(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        clash = sorted(RESERVED_TEMPLATE_KWARGS & (value or {}).keys())
        if clash:
            raise PydanticCustomError(
                "reserved", "may not set {names} (the server sets those)", {"names": ", ".join(clash)}
            )
        for text in json_strings(value):  # they reach the template, hence the tokenizer
            problem = text_problem(text)
            if problem is not None:
                raise PydanticCustomError("invalid_text", "a string in it " + problem)
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("requires_logprobs", "top_logprobs requires logprobs to be true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_limit_field(self) -> str:
        """The field `token_limit` came from, for errors that name it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(SamplingFields):
    """A raw prompt (no chat template) with `<image>` tags and a matching `urls` list (our extension)."""

    prompt: Text
    urls: list[Text] = Field(default_factory=list)
    # Legacy completions: logprobs is the number of alternatives (OpenAI allows 5; vLLM, like us, 20).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions

    @property
    def token_limit_field(self) -> str:
        return "max_tokens"
