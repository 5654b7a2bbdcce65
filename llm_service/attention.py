"""Attention over the paged KV cache: the per-step metadata and the two backends.

The KV cache of one layer is a pair of tensors (num_blocks, block_size, kv_heads, head_dim); a token
at logical index i of a sequence lives in slot block_table[i // block_size] * block_size + i % block_size.
The flat batch of a step puts single-token sequences (decodes) first, then the multi-token chunks.

- `sdpa`: torch's scaled_dot_product_attention (CPU, and the GPU fallback). Decodes are one batched
  call over their gathered, padded contexts; each prefill chunk is one call (plain causal when the
  chunk is the whole context).
- `flash_attn`: flash-attn's varlen kernel with block tables for the chunks and `flash_attn_with_kvcache`
  for the decodes, reading the paged cache in place (CUDA only; block_size must be a multiple of 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash_attn")
FLASH_BLOCK_SIZE = 256  # flash-attn's paged kernels need blocks of a multiple of 256 tokens


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` is flash_attn on CUDA when it is installed, sdpa otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "flash_attn" if flash_attn_available(device) else "sdpa"
    if name == "flash_attn" and not flash_attn_available(device):
        raise ValueError("attention backend flash_attn needs a CUDA device and the flash-attn package")
    return name


@dataclass
class PrefillChunk:
    q_start: int  # first row of the chunk in the flat batch
    q_len: int
    ctx_len: int  # tokens attended to: the cached ones plus the chunk itself
    ctx_slots: torch.Tensor | None  # (ctx_len,) cache slots; None when the chunk is the whole context
    mask: torch.Tensor | None  # (q_len, ctx_len) bool, True = attend; None when plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) cache slot of each new token
    num_decodes: int = 0  # the first rows of the batch, one token each
    decode_slots: torch.Tensor | None = None  # (D, L) padded context slots of the decodes
    decode_mask: torch.Tensor | None = None  # (D, 1, 1, L) bool; None when all contexts are L long
    prefills: list[PrefillChunk] = field(default_factory=list)
    # flash-attn only
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32, decodes first
    context_lens: torch.Tensor | None = None  # (B,) int32
    cu_seqlens_q: torch.Tensor | None = None  # (P + 1,) int32 over the prefill chunks
    cu_seqlens_k: torch.Tensor | None = None  # (P + 1,) int32
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots) -> None:
    """Store the new tokens' keys and values (T, kv_heads, head_dim) at their slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)


def sdpa_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """(T, heads, d) queries and the new (T, kv_heads, d) keys/values -> (T, heads, d)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    keys = k_cache.view(-1, *k.shape[1:])  # (slots, kv_heads, d)
    values = v_cache.view(-1, *v.shape[1:])
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    n = meta.num_decodes
    if n:
        assert meta.decode_slots is not None
        ctx_k = keys[meta.decode_slots].transpose(1, 2)  # (D, kv_heads, L, d)
        ctx_v = values[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:n, :, None, :], ctx_k, ctx_v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        )  # (D, heads, 1, d)
        out[:n] = o[:, :, 0]
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        if chunk.ctx_slots is None:
            ctx_k, ctx_v = k[rows], v[rows]
        else:
            ctx_k, ctx_v = keys[chunk.ctx_slots], values[chunk.ctx_slots]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None],  # (1, heads, q_len, d)
            ctx_k.transpose(0, 1)[None],
            ctx_v.transpose(0, 1)[None],
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        out[rows] = o[0].transpose(0, 1)
    return out


def flash_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The same contract as sdpa_attention, with flash-attn's paged kernels (CUDA)."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    assert meta.block_tables is not None and meta.context_lens is not None
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
    if meta.prefills:
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


ATTENTION = {"sdpa": sdpa_attention, "flash_attn": flash_attention}
