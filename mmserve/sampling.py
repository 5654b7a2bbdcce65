"""Generation settings, built in one place for every entry point: REST, the Python API and gRPC."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from mmserve.checkpoint import generation_config

if TYPE_CHECKING:
    from mmserve.wire import PixelLimits

log = logging.getLogger(__name__)


STRUCTURED_KINDS = ("json_schema", "regex", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must match: a JSON Schema (as JSON text), a regular expression, or a
    Lark grammar. The LLM service compiles it (llguidance) and masks every step's disallowed tokens."""

    kind: str  # one of STRUCTURED_KINDS
    spec: str


@dataclass(frozen=True)
class SamplingParams:
    """How the engine samples one request. Frozen: a request's settings are never changed in place
    (derive a variant with `dataclasses.replace`)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-n alternatives per token; None = no logprobs
    structured: StructuredOutput | None = None  # None: free text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by id


@dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's sampling defaults, applied to every field a request leaves unset: a Qwen2-VL
    Instruct request without `repetition_penalty` gets the checkpoint's 1.05, as transformers'
    `generate` would. The field defaults are neutral (what an empty generation_config.json means)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # generation_config's max_new_tokens; None = up to the context length

    @classmethod
    def from_checkpoint(cls, checkpoint: str) -> GenerationDefaults:
        config = generation_config(checkpoint)
        found = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        if config.get("max_new_tokens") is not None:
            found["max_tokens"] = int(config["max_new_tokens"])
        if found:
            log.info("sampling defaults from %s/generation_config.json: %s", checkpoint, found)
        return cls(**found)


@dataclass(frozen=True)
class SamplingChoices:
    """The sampling fields a caller set, in the engine's names; None: unset."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 and 0 both mean off
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_new_tokens: int | None = None  # None: SamplingParams' default (the gateway sets it per request)
    min_new_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs
    structured: StructuredOutput | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


def _pick(value, default):
    return default if value is None else value


def sampling_params(choices: SamplingChoices, defaults: GenerationDefaults | None = None) -> SamplingParams:
    """The engine's settings: what the caller chose, else the checkpoint's default, else neutral.

    Each entry point translates its own field names into `SamplingChoices` and calls this (REST:
    gateway/http/generation.py, the Python API: pipeline/settings.py, gRPC: mmserve.wire_pb.sampling_from_pb).
    Ranges are checked once, at the engine's admission (llm_service), which every entry point reaches."""
    d = defaults or GenerationDefaults()
    neutral = SamplingParams()
    return SamplingParams(
        temperature=_pick(choices.temperature, d.temperature),
        top_p=_pick(choices.top_p, d.top_p),
        top_k=0 if choices.top_k == -1 else _pick(choices.top_k, d.top_k),
        max_new_tokens=_pick(choices.max_new_tokens, neutral.max_new_tokens),
        min_new_tokens=_pick(choices.min_new_tokens, neutral.min_new_tokens),
        ignore_eos=_pick(choices.ignore_eos, neutral.ignore_eos),
        stop_token_ids=tuple(choices.stop_token_ids),
        seed=choices.seed,
        repetition_penalty=_pick(choices.repetition_penalty, d.repetition_penalty),
        min_p=_pick(choices.min_p, d.min_p),
        presence_penalty=_pick(choices.presence_penalty, neutral.presence_penalty),
        frequency_penalty=_pick(choices.frequency_penalty, neutral.frequency_penalty),
        logprobs=choices.logprobs,
        structured=choices.structured,
        logit_bias=tuple(sorted(choices.logit_bias)),
    )


@dataclass(frozen=True)
class GenerationSettings:
    """Everything a generation needs beyond its prompt: the engine's sampling, and what the gateway
    itself applies (the token limit, stop strings, image resize bounds)."""

    sampling: SamplingParams  # max_new_tokens is set per request, once the prompt's length is known
    max_tokens: int | None = None  # None: up to the context length (or the checkpoint's max_new_tokens)
    stop: tuple[str, ...] = ()
    pixels: PixelLimits | None = None  # per-request image resize bounds (Qwen2-VL family)


def generation_settings(
    choices: SamplingChoices,
    defaults: GenerationDefaults | None = None,
    *,
    max_tokens: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    pixels: PixelLimits | None = None,
) -> GenerationSettings:
    """The one builder of a request's settings, for the REST routes and the Python API alike."""
    return GenerationSettings(sampling_params(choices, defaults), max_tokens, tuple(stop), pixels or None)
