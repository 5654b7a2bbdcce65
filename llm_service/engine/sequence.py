"""One request's state inside the engine: its tokens, its KV blocks and how far its KV is computed.

Pure bookkeeping (torch is only read to hash image embeddings into prefix-cache keys): the scheduler
and the block manager work on these counts.
"""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmserve.wire import FinishReason, GenerateRequest

if TYPE_CHECKING:
    from llguidance import LLMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageKey:
    """What identifies an image's KV for the prefix cache: its span and a digest of its content."""

    offset: int
    length: int
    digest: bytes  # image_digest(): of the embedding bytes received (and grid), never of a url or claim

    @property
    def end(self) -> int:
        return self.offset + self.length


# Bumped if what the digest covers changes, so keys of two layouts never meet.
_DIGEST_DOMAIN = b"mmserve/llm/image-embedding/v1\0"


def image_digest(embedding: torch.Tensor, grid_thw: tuple[int, ...] = ()) -> bytes:
    """SHA-256 of an image's embedding as the service received it: dtype, shape, grid_thw and the
    raw tensor bytes. Equal digests mean equal values in the prompt, hence equal KV; the caller's
    content hash plays no part (any gRPC client can send garbage under a real image's hash).

    Pure function of the tensor's values (not of its memory layout or device). Hashing a 576 x 4096
    bf16 embedding (4.7 MB) takes a few milliseconds; hashlib releases the GIL meanwhile."""
    tensor = embedding.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    h = hashlib.sha256(_DIGEST_DOMAIN)
    dtype = str(tensor.dtype).removeprefix("torch.")
    h.update(f"dtype={dtype};shape={list(tensor.shape)};grid_thw={[int(g) for g in grid_thw]}\0".encode())
    if tensor.numel():
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # a memoryview: no copy
    return h.digest()


def image_keys(request: GenerateRequest) -> list[ImageKey]:
    """Prefix-cache keys of a request's image spans, from the embeddings the request carries.

    The grid is in the digest because Qwen2-VL's M-RoPE positions of the same rows depend on it.
    `span.content_hash` is not used: it is the caller's claim, and the LLM service keys its cache
    only by what it actually computes with."""
    return [
        ImageKey(span.offset, span.length, image_digest(span.embedding, tuple(span.grid_thw)))
        for span in request.images
    ]


class Sequence:
    """Tokens = prompt + generated so far. KV exists for the first `num_computed_tokens` of them."""

    def __init__(self, request: GenerateRequest, keys: list[ImageKey] | None = None):
        self.request = request
        self.request_id = request.request_id
        self.params = request.sampling
        self.prompt_token_ids = list(request.token_ids)
        self.output_token_ids: list[int] = []
        self.token_ids = list(request.token_ids)  # prompt + output
        self.image_keys = keys if keys is not None else image_keys(request)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache (first admission)
        self.block_table: list[int] = []  # physical KV block of each logical block
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks hashed so far
        self.chain_hashes: list[bytes] = []  # each full block's chained hash, as far as asked for
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.arrival = time.monotonic()
        self.generator: torch.Generator | None = None  # per-request RNG when a seed is given
        self.first_scheduled_at: float | None = None
        self.last_token_at: float | None = None
        self.model_state: object = None  # what the model adapter keeps per sequence (M-RoPE positions)
        self.matcher: LLMatcher | None = None  # structured output: what the next token may be

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def block_key(self, index: int, block_size: int) -> bytes:
        """The bytes that identify full block `index` given its predecessor: its token ids, and for
        each image overlapping it, the image's digest and where the image starts relative to it."""
        start, end = index * block_size, (index + 1) * block_size
        parts = [",".join(map(str, self.token_ids[start:end])).encode()]
        for key in self.image_keys:
            if key.offset < end and key.end > start:
                parts.append(b"|img" + key.digest + str(key.offset - start).encode())
        return b"".join(parts)
