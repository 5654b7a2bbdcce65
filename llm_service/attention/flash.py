"""The flash_attn attention backend (CUDA, when the optional flash-attn package is installed).

Cache layout (num_blocks, block_size, kv_heads, head_dim), read in place through block tables by
`flash_attn_varlen_func` (chunks) and `flash_attn_with_kvcache` (decodes); blocks must hold a
multiple of 256 tokens. flash-attn is imported only when a step runs, so this module (and a GPU
serving with the sdpa fallback) imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llm_service.attention.paged import LayerCache, PagedAttention, slot_mapping

if TYPE_CHECKING:
    from llm_service.engine.scheduler import ScheduledSequence

FLASH_BLOCK_SIZE = 256  # flash-attn's paged kernels need blocks of a multiple of 256 tokens


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class FlashMetadata:
    slot_mapping: torch.Tensor  # (T,) cache slot (block * block_size + row) of each new token
    num_decodes: int  # the first rows of the batch, one token each
    block_tables: torch.Tensor  # (B, max_blocks) int32, decodes first
    context_lens: torch.Tensor  # (B,) int32
    num_chunks: int = 0  # multi-token sequences after the decodes
    cu_seqlens_q: torch.Tensor | None = None  # (P + 1,) int32 over the prefill chunks
    cu_seqlens_k: torch.Tensor | None = None  # (P + 1,) int32
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


class FlashAttention(PagedAttention[FlashMetadata]):
    name = "flash_attn"

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, block_size, kv_heads, head_dim)

    def metadata(self, decodes: list[ScheduledSequence], chunks: list[ScheduledSequence]) -> FlashMetadata:
        device, items = self.device, decodes + chunks
        width = max(len(i.seq.block_table) for i in items)
        meta = FlashMetadata(
            slot_mapping(items, self.block_size, device),
            len(decodes),
            block_tables=torch.tensor(
                [i.seq.block_table + [0] * (width - len(i.seq.block_table)) for i in items],
                dtype=torch.int32,
                device=device,
            ),
            context_lens=torch.tensor([i.end for i in items], dtype=torch.int32, device=device),
            num_chunks=len(chunks),
        )
        if chunks:
            q_lens = torch.tensor([0] + [i.num_tokens for i in chunks])
            k_lens = torch.tensor([0] + [i.end for i in chunks])
            meta.cu_seqlens_q = q_lens.cumsum(0).to(device, torch.int32)
            meta.cu_seqlens_k = k_lens.cumsum(0).to(device, torch.int32)
            meta.max_seqlen_q = int(q_lens.max())
            meta.max_seqlen_k = int(k_lens.max())
        return meta

    def __call__(self, q, k, v, cache: LayerCache, meta: FlashMetadata, scale: float) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        k_cache, v_cache = cache.k, cache.v
        _, _, kv_heads, dim = k_cache.shape
        k_cache.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            out[:n] = flash_attn_with_kvcache(
                q[:n, None],  # (D, 1, heads, d)
                k_cache,
                v_cache,
                cache_seqlens=meta.context_lens[:n],
                block_table=meta.block_tables[:n],
                softmax_scale=scale,
                causal=True,
            )[:, 0]
        if meta.num_chunks:
            out[n:] = flash_attn_varlen_func(
                q[n:],
                k_cache,
                v_cache,
                cu_seqlens_q=meta.cu_seqlens_q,
                cu_seqlens_k=meta.cu_seqlens_k,
                max_seqlen_q=meta.max_seqlen_q,
                max_seqlen_k=meta.max_seqlen_k,
                softmax_scale=scale,
                causal=True,
                block_table=meta.block_tables[n:],
            )
        return out
