"""What every attention backend shares: a layer's paged KV cache and the cache slots of new tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def allocate_layers(
    num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> list[LayerCache]:
    return [
        LayerCache(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )
        for _ in range(num_layers)
    ]


def slot_mapping(items: list[ScheduledSequence], block_size: int, device: torch.device) -> torch.Tensor:
    """(T,) cache slot (block * block_size + row) of each token computed this step, in batch order."""
    slots: list[int] = []
    for item in items:
        table = item.seq.block_table
        slots.extend(
            table[i // block_size] * block_size + i % block_size for i in range(item.start, item.end)
        )
    return torch.tensor(slots, device=device)
