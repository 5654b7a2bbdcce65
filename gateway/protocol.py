"""OpenAI-compatible request bodies, validated at the HTTP edge (pydantic lives only here)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gateway.chat_template import RESERVED_TEMPLATE_KWARGS

MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; vLLM's default cap)


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do for forward compatibility.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class MMProcessorKwargs(BaseModel):
    """vLLM's `mm_processor_kwargs`, the keys this server honours (dynamic-resolution families only)."""

    model_config = ConfigDict(extra="forbid")

    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)


class SamplingFields(_Body):
    """Fields shared by chat and text completions, the extras benchmark tools send included."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # vLLM's extension: drop tokens less likely than min_p times the most likely one.
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extension: echo prompt and completion token ids in the response.
    return_token_ids: bool | None = None
    # vLLM's extension: image preprocessing options of this request (Qwen2-VL's min/max pixels).
    mm_processor_kwargs: MMProcessorKwargs | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n not in (None, 1):
            raise ValueError("n must be 1 (several choices per request are not supported)")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("at most 16 stop strings")
        return self

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
            raise ValueError(f"may not set {', '.join(clash)} (the server sets those)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    """A raw prompt (no chat template) with `<image>` tags and a matching `urls` list (our extension)."""

    prompt: str
    urls: list[str] = Field(default_factory=list)
    # Legacy completions: logprobs is the number of alternatives (OpenAI allows 5; vLLM, like us, 20).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions
