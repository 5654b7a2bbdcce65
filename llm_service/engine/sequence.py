"""One request's state inside the engine: its tokens, its KV blocks and how far its KV is computed.

Pure bookkeeping (torch only hashes an image embedding that came without a content hash): the scheduler and the block manager work on these counts.
"""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass

import torch

from mmserve.wire import FinishReason, GenerateRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageKey:
    """What identifies an image's KV for the prefix cache: its span and a digest of its content."""

    offset: int
    length: int
    digest: bytes  # hash of the image content (and grid), never of its url

    @property
    def end(self) -> int:
        return self.offset + self.length


def image_keys(request: GenerateRequest) -> list[ImageKey]:
    """Prefix-cache keys of a request's image spans.

    The gateway's content hash (SHA-256 of the image bytes) names the image; the grid is mixed in
    because one image resized to other pixel bounds gives other embeddings. Without a content hash
    the embedding's own bytes are hashed, so a span is never keyed by its placeholder ids alone.
    """
    keys = []
    for span in request.images:
        h = hashlib.sha256()
        if span.content_hash:
            h.update(b"content:" + span.content_hash.encode())
        else:
            h.update(b"embedding:" + span.embedding.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(repr(tuple(span.grid_thw)).encode())
        keys.append(ImageKey(span.offset, span.length, h.digest()))
    return keys


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
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.arrival = time.monotonic()
        self.generator: torch.Generator | None = None  # per-request RNG when a seed is given
        self.first_scheduled_at: float | None = None
        self.last_token_at: float | None = None
        self.model_state: object = None  # what the model adapter keeps per sequence (M-RoPE positions)

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
