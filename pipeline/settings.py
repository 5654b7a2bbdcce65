"""The Python API's generate_config (rtp-llm's key names), onto the one settings builder."""

from __future__ import annotations

from typing import Any

from mmserve.errors import InvalidInputError
from mmserve.sampling import (
    GenerationDefaults,
    GenerationSettings,
    SamplingChoices,
    StructuredOutput,
    generation_settings,
)
from mmserve.structured import choice_regex, grammar_of, json_schema
from mmserve.wire import PixelLimits

CONFIG_KEYS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "top_k",
        "top_p",
        "temperature",
        "repetition_penalty",
        "random_seed",
        "seed",
        "ignore_eos",
        "stop_words_str",
        "stop_words_list",
        # image resize bounds of this call (Qwen2-VL family), also accepted nested as vLLM's mm_processor_kwargs
        "min_pixels",
        "max_pixels",
        "mm_processor_kwargs",
        # structured output, as vLLM's structured_outputs: {"json": schema} | {"regex": ...} |
        # {"choice": [...]} | {"grammar": lark}
        "structured_outputs",
        # choices per prompt (1..16), each a sequence of its own; the call's responses list them
        # prompt by prompt: [prompt 0 choice 0, prompt 0 choice 1, ..., prompt 1 choice 0, ...]
        "num_return_sequences",
    }
)
MAX_RETURN_SEQUENCES = 16
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar")
PIXEL_KEYS = ("min_pixels", "max_pixels")
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the call nor the checkpoint's generation_config sets one


def _refuse_unknown(keys: Any, supported: Any, what: str) -> None:
    unknown = sorted(set(keys) - set(supported))
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; supported: {sorted(supported)}")


def _number(config: dict, key: str, kind: type) -> Any:
    value = config.get(key)
    return None if value is None else kind(value)


def _stop_token_ids(config: dict) -> tuple[int, ...]:
    ids = []
    for words in config.get("stop_words_list", []):
        if len(words) != 1:
            raise ValueError("stop_words_list entries must be single token ids, e.g. [[151645]]")
        ids.append(int(words[0]))
    return tuple(ids)


def _pixels(config: dict) -> PixelLimits:
    nested = dict(config.get("mm_processor_kwargs") or {})
    _refuse_unknown(nested, PIXEL_KEYS, "mm_processor_kwargs")
    merged = {**config, **nested}
    return PixelLimits(*(_number(merged, key, int) for key in PIXEL_KEYS))


def _structured(config: dict) -> StructuredOutput | None:
    spec = config.get("structured_outputs")
    if spec is None:
        return None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(
            f"structured_outputs takes exactly one of {list(STRUCTURED_KEYS)}, got {spec!r:.200}"
        )
    _refuse_unknown(spec, STRUCTURED_KEYS, "structured_outputs")
    ((kind, value),) = spec.items()
    if kind == "json":
        structured = StructuredOutput("json_schema", value) if isinstance(value, str) else json_schema(value)
    elif kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(
                f"structured_outputs.choice takes a non-empty list of strings, got {value!r:.200}"
            )
        structured = choice_regex(value)
    else:
        structured = StructuredOutput("regex" if kind == "regex" else "grammar", str(value))
    try:
        grammar_of(structured)
    except InvalidInputError as exc:
        raise ValueError(f"structured_outputs.{kind}: {exc}") from None
    return structured


def return_sequences(config: dict | None) -> int:
    """generate_config's num_return_sequences (1 when unset)."""
    value = (config or {}).get("num_return_sequences", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RETURN_SEQUENCES:
        raise ValueError(
            f"num_return_sequences must be an integer in [1, {MAX_RETURN_SEQUENCES}], got {value!r}"
        )
    return value


def settings_from_generate_config(
    config: dict | None, defaults: GenerationDefaults | None = None
) -> GenerationSettings:
    """rtp-llm's generate_config; keys it leaves unset come from the checkpoint's generation_config.json."""
    config = dict(config or {})
    defaults = defaults or GenerationDefaults()
    _refuse_unknown(config, CONFIG_KEYS, "generate_config")
    choices = SamplingChoices(
        temperature=_number(config, "temperature", float),
        top_p=_number(config, "top_p", float),
        top_k=_number(config, "top_k", int),
        repetition_penalty=_number(config, "repetition_penalty", float),
        min_new_tokens=_number(config, "min_new_tokens", int),
        ignore_eos=_number(config, "ignore_eos", bool),
        stop_token_ids=_stop_token_ids(config),
        seed=config.get("random_seed", config.get("seed")),
        structured=_structured(config),
    )
    max_tokens = _number(config, "max_new_tokens", int)
    if max_tokens is None:
        max_tokens = defaults.max_tokens or DEFAULT_MAX_NEW_TOKENS
    stop = list(config.get("stop_words_str", []))
    return generation_settings(choices, defaults, max_tokens=max_tokens, stop=stop, pixels=_pixels(config))
