"""Shared helpers for the BlockManager tests: stand-in images, sequences and admission."""

from __future__ import annotations

import zlib

import torch

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.sequence import Sequence, image_keys
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

BLOCK = 4
IMG = 99  # image placeholder id


def pixels(name: str, length: int = BLOCK) -> torch.Tensor:
    """A stand-in embedding of the image called `name` (other names give other values)."""
    return torch.randn(length, 8, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def span(offset: int, length: int = BLOCK, content_hash: str = "cat", **kw) -> ImageSpan:
    # By default the embedding is the named image's: the prefix cache keys by embedding bytes.
    embedding = kw.pop("embedding", None)
    embedding = pixels(content_hash or "anonymous", length) if embedding is None else embedding
    return ImageSpan(offset=offset, embedding=embedding, content_hash=content_hash, length=length, **kw)


def seq(token_ids: list[int], images: tuple[ImageSpan, ...] = ()) -> Sequence:
    request = GenerateRequest("r", list(token_ids), list(images), SamplingParams())
    return Sequence(request, image_keys(request))


def admit(manager: BlockManager, s: Sequence) -> None:
    """Allocate `s` after its cached prefix, compute its whole prompt and register its full blocks."""
    cached = manager.cached_prefix(s)
    assert manager.allocate(s, s.num_tokens - len(cached) * BLOCK, cached)
    s.num_computed_tokens = s.num_tokens
    manager.register_full_blocks(s)


def ref_counts(manager: BlockManager) -> list[int]:
    return [b.ref_count for b in manager.blocks]


def free_order(manager: BlockManager) -> list[int]:
    return list(manager._free)  # the eviction order is what these tests are about
