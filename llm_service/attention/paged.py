"""What every attention backend shares: a layer's paged KV cache, the backend base class, and the
cache slots of new tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from llm_service.engine.scheduler import ScheduledSequence


@dataclass
class LayerCache:
    """One layer's paged KV cache (layout: the backend's `cache_shape`), and its decode staging
    buffers (sdpa backend, when enabled; llm_service/attention/sdpa_staging.py)."""

    k: torch.Tensor
    v: torch.Tensor
    stage_k: torch.Tensor | None = None  # (rows, kv_heads, length, head_dim)
    stage_v: torch.Tensor | None = None


Metadata = TypeVar("Metadata")


class PagedAttention(ABC, Generic[Metadata]):
    """An attention backend over the paged KV cache: it lays out the cache, builds each step's
    `Metadata` from the scheduled sequences, and computes attention in every decoder layer."""

    name: ClassVar[str]

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    @staticmethod
    @abstractmethod
    def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The shape of one layer's key (and value) cache."""

    def allocate(
        self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> list[LayerCache]:
        """The paged KV cache of every layer, zeroed."""
        shape = self.cache_shape(num_blocks, self.block_size, kv_heads, head_dim)
        return [
            LayerCache(
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in range(num_layers)
        ]

    @abstractmethod
    def metadata(self, decodes: list[ScheduledSequence], chunks: list[ScheduledSequence]) -> Metadata:
        """This step's metadata: decodes (one token each) first, then the multi-token chunks."""

    @abstractmethod
    def __call__(self, q, k, v, cache: LayerCache, meta: Metadata, scale: float) -> torch.Tensor:
        """(T, heads, d) queries and the new (T, kv_heads, d) keys/values -> (T, heads, d); writes the
        new keys/values into `cache` at the metadata's slots first."""


def slot_mapping(items: list[ScheduledSequence], block_size: int, device: torch.device) -> torch.Tensor:
    """(T,) cache slot (block * block_size + row) of each token computed this step, in batch order."""
    slots: list[int] = []
    for item in items:
        table = item.seq.block_table
        slots.extend(
            table[i // block_size] * block_size + i % block_size for i in range(item.start, item.end)
        )
    return torch.tensor(slots, device=device)
