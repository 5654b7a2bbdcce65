"""Admission checks of a GenerateRequest: every field range-checked before it reaches the worker.

The LLM service is reachable by any gRPC client, so nothing in a request is trusted: ids, spans,
embeddings (shape, dtype and values), sampling values and sizes are checked here, once, and every
failure is an InvalidInputError (INVALID_ARGUMENT) whose message names the field. Structural checks
run first (cheap); the scan of the embedding values runs last. A request that passes cannot put
non-finite values into the KV cache (the sdpa decode reads stale blocks of freed sequences under its
mask, and 0 x NaN is NaN: before this check one NaN-embedding request turned the next text-only
request's tokens into zeros), nor make the worker's per-step work grow beyond its own tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm_service.sampler import validate_sampling
from mmserve.errors import InvalidInputError
from mmserve.interfaces import LanguageAdapter
from mmserve.wire import GenerateRequest, ImageSpan

MAX_REQUEST_ID_CHARS = 256  # the gateway's ids are ~40 characters ("chatcmpl-" + a uuid)
MAX_CONTENT_HASH_CHARS = 256  # informational only (a hex SHA-256 is 64); never a cache key here
# Embedding dtypes accepted on the wire; they are cast to the model's dtype when written.
EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The largest |value| of an embedding: float16's largest finite value. Far beyond what any vision
# projector emits (token embeddings are ~1e-2, projector outputs tens at most), and small enough that
# the cast to a float16 model's dtype stays finite and the residual stream is far from overflowing
# (values near float32's limit could turn inf inside the forward, and inf/NaN KV reaches others).
MAX_EMBEDDING_ABS = 65504.0


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the served model's facts."""

    vocab_size: int
    max_model_len: int  # prompt + output; a prompt may have at most max_model_len - 1 tokens
    image_token_id: int
    hidden_size: int
    dtype: torch.dtype  # the model's: embedding values must stay finite when cast to it (embedding_bound)


def check_request(request: GenerateRequest, model: LanguageAdapter, max_model_len: int) -> None:
    """validate_request against the served model's facts, then the family's own checks (e.g.
    Qwen2-VL's grid_thw against its embedding rows)."""
    limits = RequestLimits(
        model.vocab_size, max_model_len, model.image_token_id, model.hidden_size, model.dtype
    )
    validate_request(request, limits)
    model.validate_request(request)


def _fail(message: str) -> None:
    raise InvalidInputError(message)


def validate_request(request: GenerateRequest, limits: RequestLimits) -> None:
    """Raise InvalidInputError naming the first field out of range."""
    _validate_request_id(request.request_id)
    _validate_token_ids(request.token_ids, limits)
    validate_sampling(request.sampling, limits.vocab_size)
    _validate_spans(request, limits)
    for i, span in enumerate(request.images):  # last: the only check that reads every value
        validate_embedding_values(span.embedding, limits.dtype, f"image span {i}")


def _validate_request_id(request_id: str) -> None:
    if not request_id:
        _fail("request_id is empty")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        _fail(f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} are allowed")
    if not request_id.isprintable():  # it is logged: no control characters, no line breaks
        _fail("request_id contains non-printable characters")


def _validate_token_ids(ids: list[int], limits: RequestLimits) -> None:
    if not ids:
        _fail("token_ids is empty")
    if len(ids) >= limits.max_model_len:
        _fail(
            f"token_ids: prompt has {len(ids)} tokens; the model accepts at most {limits.max_model_len - 1}"
        )
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        _fail(f"token_ids: token id {bad} is outside the vocabulary [0, {limits.vocab_size})")


def _validate_spans(request: GenerateRequest, limits: RequestLimits) -> None:
    ids = request.token_ids
    covered = end = 0
    for i, span in enumerate(request.images):
        _validate_span_fields(i, span, limits)
        if span.offset < end:
            _fail(
                f"image span {i}: offset {span.offset} overlaps or precedes the previous span "
                f"(spans must be sorted by offset and must not overlap)"
            )
        if span.offset + span.length > len(ids):
            _fail(
                f"image span {i} [{span.offset}, {span.offset + span.length}) exceeds the {len(ids)} "
                f"prompt tokens"
            )
        if any(t != limits.image_token_id for t in ids[span.offset : span.offset + span.length]):
            _fail(f"image span {i} covers tokens other than the image placeholder id {limits.image_token_id}")
        end = span.offset + span.length
        covered += span.length
    placeholders = sum(1 for t in ids if t == limits.image_token_id)
    if placeholders != covered:
        _fail(f"prompt has {placeholders} image placeholder tokens but the image spans cover {covered}")


def _validate_span_fields(i: int, span: ImageSpan, limits: RequestLimits) -> None:
    """One span's own fields: offset, length, embedding shape and dtype, content_hash, grid_thw."""
    if span.offset < 0:
        _fail(f"image span {i}: offset {span.offset} is negative")
    if span.length < 1:
        _fail(f"image span {i} has length {span.length}; it must be >= 1")
    embedding = span.embedding
    if not isinstance(embedding, torch.Tensor):
        _fail(f"image span {i}: embedding is not a tensor")
    shape = tuple(embedding.shape)
    if len(shape) != 2 or shape[1] != limits.hidden_size:
        _fail(f"image span {i}: embedding shape {list(shape)} is not [N, {limits.hidden_size}]")
    if span.length != shape[0]:
        _fail(f"image span {i}: length {span.length} differs from its {shape[0]} embedding rows")
    if embedding.dtype not in EMBEDDING_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in EMBEDDING_DTYPES)
        _fail(
            f"image span {i}: embedding dtype {str(embedding.dtype).removeprefix('torch.')} is not "
            f"allowed (one of {allowed})"
        )
    if len(span.content_hash) > MAX_CONTENT_HASH_CHARS:
        _fail(
            f"image span {i}: content_hash has {len(span.content_hash)} characters; at most "
            f"{MAX_CONTENT_HASH_CHARS} are allowed"
        )
    grid = tuple(span.grid_thw)
    if grid and (len(grid) != 3 or min(grid) < 1):
        _fail(f"image span {i}: grid_thw {list(grid)} must be empty or three positive integers [t, h, w]")


def embedding_bound(dtype: torch.dtype) -> float:
    """The largest |value| an embedding may hold for a model served in `dtype`."""
    return min(MAX_EMBEDDING_ABS, torch.finfo(dtype).max) if dtype.is_floating_point else MAX_EMBEDDING_ABS


def validate_embedding_values(embedding: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Every value finite and within +-embedding_bound(model dtype). One pass (aminmax propagates
    NaN): ~10 ms for a 576 x 4096 embedding on a CPU core, so it runs off the event loop."""
    if embedding.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(embedding.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        _fail(f"{where}: embedding contains non-finite values (NaN or inf)")
    bound = embedding_bound(dtype)
    if not -bound <= lo <= hi <= bound:
        _fail(
            f"{where}: embedding values must be within [-{bound:g}, {bound:g}] (the model serves in "
            f"{str(dtype).removeprefix('torch.')}); got [{lo:g}, {hi:g}]"
        )
