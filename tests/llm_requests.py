"""GenerateRequests for the LLM service's defense tests, built field by field as any gRPC client could,
and a corpus of malformed ones, each with the needle its INVALID_ARGUMENT message must hold."""

from __future__ import annotations

from functools import partial

import torch

from mmserve.proto import llm_pb2
from mmserve.tensor_codec import tensor_to_pb

ROWS = 6  # image rows; with the tests' block size of 4 the image starts in block 0: no block is free of it
H = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # the real image's hash
REAL = 1  # seeds of the "real" image embedding E and of the garbage G
GARBAGE = 2


def embedding(engine, seed: int, rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, engine.info().hidden_size, generator=torch.Generator().manual_seed(seed))


def prompt(engine, head: tuple[int, ...] = (1, 40), rows: int = ROWS) -> list[int]:
    return [*head, *[engine.info().image_token_id] * rows, 41, 42]


def generate_pb(ids, spans=(), request_id="req-1", **sampling) -> llm_pb2.GenerateRequest:
    """A GenerateRequest built field by field, as any client could. spans: (offset, tensor, hash)."""
    params = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True, **sampling}
    return llm_pb2.GenerateRequest(
        request_id=request_id,
        token_ids=ids,
        images=[
            llm_pb2.ImageSpan(offset=o, length=len(t), embedding=tensor_to_pb(t), content_hash=h)
            for o, t, h in spans
        ],
        sampling=llm_pb2.SamplingParams(**params),
    )


def malformed(engine) -> dict[str, llm_pb2.GenerateRequest]:
    """needle -> a request that must be INVALID_ARGUMENT with `needle` in its message."""
    img = engine.info().image_token_id
    return {
        **_malformed_ids(engine),
        **_malformed_spans(engine),
        **_malformed_sampling(engine),
        # and a correct request behind a wrong hash-less twin: placeholders without a span
        "prompt has 1 image placeholder tokens but the image spans cover 0": generate_pb([1, img, 2]),
    }


def _with_span(ids: list[int], real: torch.Tensor, **fields) -> llm_pb2.GenerateRequest:
    """A request with one image span of `real` at offset 2, with `fields` of the span overwritten."""
    request = generate_pb(ids, [(2, real, H)])
    span = request.images[0]
    for name, value in fields.items():
        if name == "embedding":
            span.embedding.CopyFrom(value)
        elif name == "grid_thw":
            span.grid_thw[:] = value
        else:
            setattr(span, name, value)
    return request


def _bad_tensor(real: torch.Tensor, **fields):
    """`real` on the wire, with `fields` of the tensor message overwritten."""
    message = tensor_to_pb(real)
    for name, value in fields.items():
        if name == "shape":
            message.shape[:] = value
        else:
            setattr(message, name, value)
    return message


def _malformed_ids(engine) -> dict[str, llm_pb2.GenerateRequest]:
    vocab = engine.model.vocab_size
    return {
        # request_id
        "request_id is empty": generate_pb([1, 2], request_id=""),
        "request_id has 300 characters": generate_pb([1, 2], request_id="x" * 300),
        "request_id contains non-printable": generate_pb([1, 2], request_id="a\r\nforged log line"),
        # token_ids
        "token_ids is empty": generate_pb([]),
        f"token_ids: token id {vocab} is outside the vocabulary": generate_pb([1, vocab]),
        "token_ids: token id -5 is outside the vocabulary": generate_pb([1, -5]),
        f"token_ids: prompt has {engine.max_model_len} tokens": generate_pb([1] * engine.max_model_len),
    }


def _malformed_spans(engine) -> dict[str, llm_pb2.GenerateRequest]:
    ids, real, hidden = prompt(engine), embedding(engine, REAL), engine.info().hidden_size
    half = embedding(engine, 4, rows=3)
    with_span, bad_tensor = partial(_with_span, ids, real), partial(_bad_tensor, real)
    return {
        # image spans: placement
        "image span 0: offset -1 is negative": with_span(offset=-1),
        "image span 0 has length 0": with_span(length=0),
        "image span 0: length 5 differs from its 6 embedding rows": with_span(length=5),
        "image span 0 [5, 11) exceeds the 10 prompt tokens": with_span(offset=5),
        "image span 0 covers tokens other than the image placeholder": with_span(offset=1),
        "image spans cover 0": generate_pb(ids),
        "image span 1: offset 4 overlaps or precedes": generate_pb(ids, [(2, half, H), (4, half, H)]),
        "image span 1: offset 2 overlaps or precedes": generate_pb(ids, [(5, half, H), (2, half, H)]),
        # image spans: the embedding tensor
        f"image span 0: embedding shape [6, {hidden + 1}] is not [N, {hidden}]": with_span(
            embedding=tensor_to_pb(torch.zeros(ROWS, hidden + 1))
        ),
        f"image span 0: embedding shape [6, {hidden}, 1] is not": with_span(
            embedding=tensor_to_pb(torch.zeros(ROWS, hidden, 1))
        ),
        "image span 0: embedding dtype int64 is not allowed": with_span(
            embedding=tensor_to_pb(torch.zeros(ROWS, hidden, dtype=torch.int64))
        ),
        "image span 0: embedding: unsupported tensor dtype 'complex64'": with_span(
            embedding=bad_tensor(dtype="complex64")
        ),
        "image span 0: embedding: tensor of shape": with_span(embedding=bad_tensor(data=b"\0" * 10)),
        "image span 0: embedding: tensor shape [6, -64] has a negative dimension": with_span(
            embedding=bad_tensor(shape=[6, -64])
        ),
        "image span 0: embedding values must be within": with_span(
            embedding=tensor_to_pb(torch.full((ROWS, hidden), 1e9))
        ),
        "image span 0: embedding contains non-finite values": with_span(
            embedding=tensor_to_pb(torch.full((ROWS, hidden), float("nan")))
        ),
        "image span 0: content_hash has 1000 characters": with_span(content_hash="f" * 1000),
        "image span 0: grid_thw [1, 2] must be empty or three": with_span(grid_thw=[1, 2]),
        "image span 0: grid_thw [1, 0, 6] must be empty or three": with_span(grid_thw=[1, 0, 6]),
    }


def _malformed_sampling(engine) -> dict[str, llm_pb2.GenerateRequest]:
    vocab = engine.model.vocab_size
    return {
        # sampling
        "temperature must be finite and >= 0, got -1": generate_pb([1, 2], temperature=-1.0),
        "temperature must be finite and >= 0, got nan": generate_pb([1, 2], temperature=float("nan")),
        "temperature must be finite and >= 0, got inf": generate_pb([1, 2], temperature=float("inf")),
        "top_p must be in [0, 1]": generate_pb([1, 2], top_p=1.5),
        "top_k must be -1, 0 (both off) or positive": generate_pb([1, 2], top_k=-2),
        "min_p must be in [0, 1]": generate_pb([1, 2], min_p=float("nan")),
        "repetition_penalty must be finite and > 0, got -1": generate_pb([1, 2], repetition_penalty=-1.0),
        "repetition_penalty must be finite and > 0, got inf": generate_pb(
            [1, 2], repetition_penalty=float("inf")
        ),
        "presence_penalty must be in [-2, 2]": generate_pb([1, 2], presence_penalty=2.5),
        "frequency_penalty must be in [-2, 2]": generate_pb([1, 2], frequency_penalty=float("-inf")),
        "logprobs must be in [0, 20], got 21": generate_pb([1, 2], logprobs=21),
        "logprobs must be in [0, 20], got -1": generate_pb([1, 2], logprobs=-1),
        "max_new_tokens must be >= 1, got 0": generate_pb([1, 2], max_new_tokens=0),
        "max_new_tokens must be >= 1, got -3": generate_pb([1, 2], max_new_tokens=-3),
        "min_new_tokens must be >= 0": generate_pb([1, 2], min_new_tokens=-1),
        f"stop_token_ids must be in [0, {vocab})": generate_pb([1, 2], stop_token_ids=[5, vocab]),
        "stop_token_ids has 1025 ids; at most 1024": generate_pb([1, 2], stop_token_ids=[5] * 1025),
    }
