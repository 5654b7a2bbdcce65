"""Structured output in the LLM engine (llguidance matchers over the checkpoint's tokenizer), on the tiny
LLaVA checkpoint: greedy constrained decoding equals transformers' own model decoding under the same
mask, the output follows its JSON schema / regex whatever the weights, and the gRPC surface refuses a
constraint it cannot compile with INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import pytest
import torch
from llguidance import LLMatcher
from transformers import (
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from mmserve.errors import InvalidInputError
from mmserve.proto import llm_pb2
from mmserve.sampling import StructuredOutput
from mmserve.structured import MatcherFactory, allowed_tokens, grammar_of, json_schema
from mmserve.wire import FinishReason, GenerateRequest, SamplingParams
from mmserve.wire_pb import generate_request_to_pb
from tests.service.test_llm_service import with_server

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["color", "count", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["hello world", "the answer is", "what is in the picture"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine(load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))), max_running=8)
    yield engine
    engine.stop()


def generate(engine, requests):
    async def one(request):
        ids, finish = [], None
        async for out in engine.generate(request):
            ids += out.token_ids
            finish = out.finish_reason
        return ids, finish

    async def run():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(run())


def request(tokenizer, prompt, structured, **sampling):
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = SamplingParams(
        **{"temperature": 0.0, "max_new_tokens": 80, "structured": structured, **sampling}
    )
    return GenerateRequest(f"r-{prompt}", ids, [], params)


def check_schema(value: dict) -> None:
    assert set(value) == {"color", "count", "tags"}, value
    assert value["color"] in ("red", "green", "blue")
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 2
    assert all(isinstance(t, str) and len(t) <= 4 for t in value["tags"])


class _Mask(LogitsProcessor):
    """transformers' side of the reference: the same llguidance mask on HF's own logits."""

    def __init__(self, matcher, vocab):
        self.matcher, self.vocab = matcher, vocab

    def __call__(self, input_ids, scores):
        allowed = allowed_tokens([self.matcher], self.vocab)[0]
        return scores.masked_fill(~allowed[None, : scores.shape[-1]], float("-inf"))


class _Consume(StoppingCriteria):
    """Feeds each new token to the matcher; stops once the grammar is complete (as the engine does)."""

    def __init__(self, matcher):
        self.matcher = matcher

    def __call__(self, input_ids, scores, **kwargs):
        assert self.matcher.consume_token(int(input_ids[0, -1]))
        return torch.tensor([self.matcher.is_stopped()])


def test_greedy_constrained_decoding_equals_transformers_under_the_same_mask(
    tiny_checkpoint, tokenizer, engine
):
    reference = LlavaForConditionalGeneration.from_pretrained(
        str(tiny_checkpoint), dtype=torch.float32
    ).eval()
    vocab = reference.config.text_config.vocab_size
    factory = MatcherFactory("llava", str(tiny_checkpoint), vocab, engine.model.eos_token_ids)
    constraints = [json_schema(SCHEMA), StructuredOutput("regex", r"(yes|no|maybe): [a-z]{2,6}\.")]
    for structured in constraints:
        ours = generate(engine, [request(tokenizer, p, structured) for p in PROMPTS])
        for prompt, (tokens, finish) in zip(PROMPTS, ours, strict=True):
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            matcher = factory.matcher(structured)
            with torch.inference_mode():
                out = reference.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=80,
                    logits_processor=LogitsProcessorList([_Mask(matcher, vocab)]),
                    stopping_criteria=StoppingCriteriaList([_Consume(matcher)]),
                )
            theirs = out[0, ids.shape[1] :].tolist()
            assert tokens == theirs, (
                structured.kind,
                prompt,
                tokenizer.decode(tokens),
                tokenizer.decode(theirs),
            )
            assert finish == FinishReason.STOP


def test_outputs_follow_the_schema_and_the_regex_whatever_the_sampling(tokenizer, engine):
    structured = json_schema(SCHEMA)
    requests = [
        request(tokenizer, p, structured, temperature=1.0, seed=seed, top_p=0.95)
        for seed in range(4)
        for p in PROMPTS
    ]
    for tokens, finish in generate(engine, requests):
        assert finish == FinishReason.STOP, tokenizer.decode(tokens)
        check_schema(json.loads(tokenizer.decode(tokens)))
    pattern = r"[0-9]{3}-(ab|cd)"
    regex = StructuredOutput("regex", pattern)
    for tokens, finish in generate(
        engine, [request(tokenizer, p, regex, temperature=1.5, seed=9) for p in PROMPTS]
    ):
        assert finish == FinishReason.STOP
        assert re.fullmatch(pattern, tokenizer.decode(tokens)), tokenizer.decode(tokens)


def test_a_constrained_row_does_not_change_its_unconstrained_neighbours(tokenizer, engine):
    free = request(tokenizer, "hello world", None, max_new_tokens=12)
    alone = generate(engine, [free])[0]
    together = generate(engine, [free, request(tokenizer, "the answer is", json_schema(SCHEMA))])
    assert together[0] == alone


def test_min_tokens_does_not_outlast_a_complete_grammar(tokenizer, engine):
    # "yes" is complete after one or two tokens; min_new_tokens asks for 10 and masks the end tokens,
    # but nothing but an end may follow: the grammar wins and the output is exactly "yes".
    choice = StructuredOutput("regex", "yes")
    ((tokens, finish),) = generate(engine, [request(tokenizer, "hello", choice, min_new_tokens=10)])
    assert tokenizer.decode(tokens).replace(tokenizer.eos_token, "") == "yes"
    assert finish == FinishReason.STOP


def test_grpc_refuses_a_constraint_it_cannot_compile(tokenizer, engine):
    cases = {
        "the regex cannot be used": StructuredOutput("regex", "a(b"),
        "the grammar cannot be used": StructuredOutput("grammar", "start: undefined_rule"),
        "is not valid JSON": StructuredOutput("json_schema", "{not json"),
        "invalid type: frobnicate": StructuredOutput("json_schema", '{"type": "frobnicate"}'),
    }

    async def body(stub, channel, address):
        codes = {}
        for expected, structured in cases.items():
            req = generate_request_to_pb(request(tokenizer, "hi", structured))
            try:
                [m async for m in stub.Generate(req)]
                codes[expected] = None
            except grpc.aio.AioRpcError as exc:
                codes[expected] = (exc.code(), exc.details())
        empty = generate_request_to_pb(request(tokenizer, "hi", None))
        empty.sampling.structured.SetInParent()  # a StructuredOutput naming no kind
        try:
            [m async for m in stub.Generate(empty)]
            codes["set one of"] = None
        except grpc.aio.AioRpcError as exc:
            codes["set one of"] = (exc.code(), exc.details())
        ok = generate_request_to_pb(request(tokenizer, "hi", StructuredOutput("regex", "ok")))
        served = [m async for m in stub.Generate(ok)]
        return codes, served

    codes, served = with_server(engine, body)
    for expected, got in codes.items():
        assert got is not None, f"{expected}: accepted"
        code, details = got
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (expected, code, details)
        assert expected.lower() in details.lower(), (expected, details)
    assert tokenizer.decode([t for m in served for t in m.token_ids]) == "ok"
    assert served[-1].finish_reason == llm_pb2.FINISH_REASON_STOP


def test_grammar_checks_name_what_is_wrong():
    with pytest.raises(Exception, match="over 65536 bytes"):
        grammar_of(StructuredOutput("regex", "a" * 70_000))
    with pytest.raises(Exception, match="is empty"):
        grammar_of(StructuredOutput("grammar", "  "))
    with pytest.raises(Exception, match="a JSON schema is an object"):
        grammar_of(StructuredOutput("json_schema", "[1, 2]"))
    assert LLMatcher.validate_grammar(grammar_of(json_schema(SCHEMA))) == ""


def test_a_model_without_a_tokenizer_explains_itself():
    factory = MatcherFactory("llava", None, 400, [2])
    with pytest.raises(
        Exception, match="structured output is unavailable on this server: the model has no tokenizer"
    ):
        factory.matcher(json_schema(SCHEMA))


AMBIGUOUS = 'start: x\nx: x x | x x x | "a" | "b" | x "c" x'  # Earley rows grow with every token


def test_a_grammar_past_the_parser_limits_fails_its_own_request_only(tokenizer, engine):
    # Forced to write "a" forever, the ambiguous grammar's matcher hits the per-token work limit: that
    # request ends with INVALID_ARGUMENT naming it, while a free request beside it completes.
    bias = tuple((t, 100.0) for t in tokenizer("a", add_special_tokens=False)["input_ids"][-1:])
    hostile = request(
        tokenizer, "hi", StructuredOutput("grammar", AMBIGUOUS), max_new_tokens=400, logit_bias=bias
    )
    free = request(tokenizer, "hello world", None, max_new_tokens=30, ignore_eos=True)

    async def run():
        async def one(r):
            try:
                return [t async for out in engine.generate(r) for t in out.token_ids]
            except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
                return exc

        return await asyncio.gather(one(hostile), one(free))

    failed, served = asyncio.run(run())
    assert isinstance(failed, InvalidInputError), failed
    assert "structured output stopped at output token" in str(failed) and "max is 1000" in str(failed)
    assert len(served) == 30


def test_non_finite_numbers_in_a_schema_are_refused():
    with pytest.raises(InvalidInputError, match="NaN or an infinity"):
        json_schema({"type": "number", "maximum": float("inf")})
    with pytest.raises(InvalidInputError, match="Infinity is not a JSON number"):
        grammar_of(StructuredOutput("json_schema", '{"type": "number", "maximum": Infinity}'))
