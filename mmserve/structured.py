"""Structured output: a request's JSON Schema, regex or grammar as an llguidance grammar, and the
token matchers the LLM service masks each step's logits with.

Compiling and checking a constraint needs no tokenizer (the gateway checks one before any image is
fetched, and names the request field at fault); a matcher needs the checkpoint's tokenizer, which the
LLM service loads on the first structured request (`MatcherFactory`)."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import numpy as np

from mmserve.errors import InvalidInputError
from mmserve.sampling import STRUCTURED_KINDS, StructuredOutput

if TYPE_CHECKING:
    import torch
    from llguidance import LLMatcher, LLTokenizer
    from llguidance._lib import JsonCompileOptions

# A constraint's text (schema, regex or grammar) beyond this is refused: compiling one is the caller's
# cost paid by the service, and real schemas are a few KiB.
MAX_SPEC_BYTES = 64 * 1024

# Compact JSON (`{"a":1,"b":[2,3]}`): no free whitespace, where a model can loop on
# newlines and spaces until max_tokens (vLLM's disable_any_whitespace). A schema's own "x-guidance"
# options override these, e.g. {"x-guidance": {"whitespace_flexible": true}}.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}

# The work a matcher may do per token (llguidance's defaults: 2,000 items in an Earley row, 50,000 items
# and 200,000 lexer fuel a step). Masks are computed on the engine's thread for every constrained row of
# every step, so an ambiguous grammar must not slow everyone's step for long: past these limits its
# matcher stops with an error and only its own request fails. Measured: the 60-byte ambiguous grammar
# in tests/service/test_structured_engine.py took up to 0.55 s a mask under the defaults (error at token
# 332) and takes up to ~60 ms under these (error at token ~166). A JSON object of up to ~250 optional
# properties, enums of thousands of values and regexes stay below them.
MAX_ITEMS_IN_ROW = 1000
STEP_MAX_ITEMS = 10_000
STEP_LEXER_FUEL = 100_000

_WHAT = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}


def grammar_of(structured: StructuredOutput) -> str:
    """The llguidance grammar of a constraint, checked (InvalidInputError naming what is wrong)."""
    from llguidance import LLMatcher

    kind, spec = structured.kind, structured.spec
    if kind not in STRUCTURED_KINDS:
        raise InvalidInputError(f"structured output: unknown kind {kind!r}, use one of {STRUCTURED_KINDS}")
    what = _WHAT[kind]
    if len(spec.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise InvalidInputError(f"the {what} is over {MAX_SPEC_BYTES} bytes")
    if not spec.strip():
        raise InvalidInputError(f"the {what} is empty")
    try:
        if kind == "json_schema":
            try:
                schema = json.loads(spec, parse_constant=_no_constant)
            except ValueError as exc:
                raise InvalidInputError(f"the JSON schema is not valid JSON ({exc})") from None
            if not isinstance(schema, dict | bool):
                raise InvalidInputError(
                    f"a JSON schema is an object (or true/false), got {type(schema).__name__}"
                )
            grammar = LLMatcher.grammar_from_json_schema(spec, defaults=JSON_DEFAULTS)
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(spec)
        else:
            grammar = LLMatcher.grammar_from_lark(spec)
    except (ValueError, TypeError, UnicodeError) as exc:  # what the compiler raises instead of reporting
        raise InvalidInputError(f"the {what} cannot be used: {_one_line(str(exc))}") from None
    error = LLMatcher.validate_grammar(grammar, limits=parser_limits())
    if error:
        raise InvalidInputError(f"the {what} cannot be used: {_one_line(error)}")
    return grammar


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parser_limits():
    from llguidance import LLParserLimits

    return LLParserLimits(
        max_items_in_row=MAX_ITEMS_IN_ROW,
        step_max_items=STEP_MAX_ITEMS,
        step_lexer_fuel=STEP_LEXER_FUEL,
        verbose_errors=False,
    )


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_schema(schema: object) -> StructuredOutput:
    """A schema as JSON text; one holding NaN or an infinity (Python's json reads them) is refused."""
    try:
        return StructuredOutput("json_schema", json.dumps(schema, allow_nan=False))
    except ValueError:
        raise InvalidInputError(
            "the JSON schema holds NaN or an infinity, which JSON has no number for"
        ) from None


def any_json_object() -> StructuredOutput:
    return json_schema({"type": "object"})


def choice_regex(choices: list[str]) -> StructuredOutput:
    """One of `choices`, exactly (vLLM's guided_choice)."""
    import re

    return StructuredOutput("regex", "|".join(f"(?:{re.escape(c)})" for c in choices))


def load_fast_tokenizer(family: str, path: str):
    """The checkpoint's tokenizer as a transformers fast tokenizer (what llguidance reads)."""
    if family == "qwen_vl":
        from mmserve.qwen_tokenizer import load_qwen_tokenizer

        return load_qwen_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class MatcherFactory:
    """Per-request matchers over one checkpoint's tokenizer (loaded once, on first use: ~1 s)."""

    def __init__(self, family: str, tokenizer_path: str | None, vocab_size: int, eos_token_ids: list[int]):
        self.family, self.tokenizer_path = family, tokenizer_path
        self.vocab_size, self.eos_token_ids = vocab_size, list(eos_token_ids)
        self._tokenizer: LLTokenizer | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None and self._error is None:
                self._tokenizer, self._error = self._load()
        if self._tokenizer is None:
            raise InvalidInputError(f"structured output is unavailable on this server: {self._error}")
        return self._tokenizer

    def _load(self) -> tuple[LLTokenizer | None, str | None]:
        if not self.tokenizer_path:
            return None, "the model has no tokenizer (set TOKENIZER_PATH for the LLM service)"
        try:
            import llguidance.hf

            hf = load_fast_tokenizer(self.family, self.tokenizer_path)
            eos = self.eos_token_ids or hf.eos_token_id
            return llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=eos), None
        except Exception as exc:  # noqa: BLE001 - reported on every structured request, not fatal
            return None, f"the tokenizer at {self.tokenizer_path} does not load ({type(exc).__name__}: {exc})"

    def matcher(self, structured: StructuredOutput) -> LLMatcher:
        from llguidance import LLMatcher

        grammar = grammar_of(structured)
        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise InvalidInputError(
                f"the {_WHAT[structured.kind]} cannot be used: {_one_line(matcher.get_error())}"
            )
        return matcher


def allowed_tokens(matchers: list[LLMatcher], vocab_size: int) -> torch.Tensor:
    """A (len(matchers), vocab_size) bool tensor: the tokens each matcher allows next."""
    import torch

    width = (vocab_size + 31) // 32 * 4  # llguidance's bitmask: 32-bit words, bit i = token i
    bits = np.zeros((len(matchers), width), dtype=np.uint8)
    for k, matcher in enumerate(matchers):
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        bits[k, : min(width, mask.size)] = mask[:width]
    allowed = np.unpackbits(bits, axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(np.ascontiguousarray(allowed).view(np.bool_))
