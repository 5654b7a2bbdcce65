"""Attention over the paged KV cache: the per-step metadata and the two backends.

A token at logical index i of a sequence lives in block block_table[i // block_size], row
i % block_size. The flat batch of a step puts single-token sequences (decodes) first, then the
multi-token chunks (prefill, or recompute after preemption).

- `sdpa` (CPU, and the GPU fallback). Cache layout (kv_heads, num_blocks, block_size, head_dim), so
  that gathering a sequence's blocks gives each head's keys as one contiguous (tokens, head_dim)
  matrix. Decodes are one batched matmul-softmax-matmul (GQA without repeating keys) over contiguous
  copies of their KV: either the decode staging rows (below) or, when those would not fit their memory
  budget, the decodes' blocks gathered afresh into a reused workspace. Each prefill chunk is one torch
  SDPA call.
- Decode staging (sdpa): every decoding sequence owns a row of a per-layer (rows, kv_heads, length,
  head_dim) buffer holding a contiguous copy of its KV. A row is filled from the paged cache once, when
  the sequence starts decoding (or comes back after a preemption), and then grows by the one new token
  of each step; re-gathering every sequence's whole context every step cost more than the rest of a
  decode step on CPU. The paged cache stays the source of truth (prefix sharing, preemption).
- `flash_attn` (CUDA, when flash-attn is installed). Cache layout (num_blocks, block_size, kv_heads,
  head_dim), read in place through block tables by `flash_attn_varlen_func` (chunks) and
  `flash_attn_with_kvcache` (decodes); blocks must hold a multiple of 256 tokens.
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
    ctx_blocks: torch.Tensor | None = None  # (n,) blocks of the context; None when the chunk is all of it
    mask: torch.Tensor | None = None  # (q_len, n * block_size) bool, True = attend; with ctx_blocks


@dataclass
class LayerCache:
    """One layer's paged KV cache, and its decode staging buffers (sdpa backend, when enabled)."""

    k: torch.Tensor
    v: torch.Tensor
    stage_k: torch.Tensor | None = None  # (rows, kv_heads, length, head_dim)
    stage_v: torch.Tensor | None = None


@dataclass
class DecodeStage:
    """This step's use of the staging rows."""

    rows: torch.Tensor  # (D,) the row of each decode
    positions: torch.Tensor  # (D,) index of each decode's new token in its row
    fills: list[tuple[int, torch.Tensor]]  # (row, blocks): copy these cached blocks into the row first
    valid: torch.Tensor  # (R, L) bool: the rows and columns attended; R rows, L columns in use


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) cache slot (block * block_size + row) of each new token
    num_decodes: int = 0  # the first rows of the batch, one token each
    prefills: list[PrefillChunk] = field(default_factory=list)
    # sdpa decodes
    decode_blocks: torch.Tensor | None = None  # (D * n,) each decode's first n blocks, padded with block 0
    decode_valid: torch.Tensor | None = None  # (D, n * block_size) bool; None when every row is valid
    stage: DecodeStage | None = None  # decodes read the staging rows instead of gathering blocks
    # flash_attn
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32, decodes first
    context_lens: torch.Tensor | None = None  # (B,) int32
    cu_seqlens_q: torch.Tensor | None = None  # (P + 1,) int32 over the prefill chunks
    cu_seqlens_k: torch.Tensor | None = None  # (P + 1,) int32
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0


class SdpaAttention:
    name = "sdpa"

    def __init__(self):
        self._workspace: torch.Tensor | None = None  # reused gather buffer, grown on demand

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (kv_heads, num_blocks, block_size, head_dim)

    def _gather(self, k_cache, v_cache, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_heads, n, block_size, d) keys and values of `blocks`, in the workspace."""
        heads, _, size, dim = k_cache.shape
        need = 2 * heads * blocks.numel() * size * dim
        ws = self._workspace
        if ws is None or ws.numel() < need or ws.dtype != k_cache.dtype or ws.device != k_cache.device:
            ws = self._workspace = k_cache.new_empty(max(need, 2 * (ws.numel() if ws is not None else 0)))
        keys = ws[: need // 2].view(heads, blocks.numel(), size, dim)
        values = ws[need // 2 : need].view(heads, blocks.numel(), size, dim)
        torch.index_select(k_cache, 1, blocks, out=keys)
        torch.index_select(v_cache, 1, blocks, out=values)
        return keys, values

    def __call__(self, q, k, v, cache: LayerCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """(T, heads, d) queries and the new (T, kv_heads, d) keys/values -> (T, heads, d)."""
        k_cache, v_cache = cache.k, cache.v
        kv_heads, _, size, dim = k_cache.shape
        slots = meta.slot_mapping
        k_cache.view(kv_heads, -1, dim).index_copy_(1, slots, k.transpose(0, 1))
        v_cache.view(kv_heads, -1, dim).index_copy_(1, slots, v.transpose(0, 1))
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n and meta.stage is not None:
            out[:n] = self._decode_staged(q[:n], k[:n], v[:n], cache, meta.stage, scale)
        elif n:
            out[:n] = self._decode(q[:n], k_cache, v_cache, meta, scale)
        for chunk in meta.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            if chunk.ctx_blocks is None:
                ctx_k, ctx_v = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (kv_heads, q_len, d)
            else:
                ctx_k, ctx_v = self._gather(k_cache, v_cache, chunk.ctx_blocks)
                ctx_k, ctx_v = ctx_k.view(kv_heads, -1, dim), ctx_v.view(kv_heads, -1, dim)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],  # (1, heads, q_len, d)
                ctx_k[None],
                ctx_v[None],
                attn_mask=chunk.mask,
                is_causal=chunk.mask is None,
                scale=scale,
                enable_gqa=q.shape[1] != kv_heads,
            )
            out[rows] = o[0].transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """One query per sequence: (D, heads, d) -> (D, heads, d)."""
        assert meta.decode_blocks is not None
        decodes, heads, dim = q.shape
        kv_heads, _, size, _ = k_cache.shape
        keys, values = self._gather(k_cache, v_cache, meta.decode_blocks)
        keys = keys.view(kv_heads, decodes, -1, dim)  # (kv_heads, D, L, d)
        values = values.view(kv_heads, decodes, -1, dim)
        group = heads // kv_heads
        queries = q.view(decodes, kv_heads, group, dim).transpose(0, 1)  # (kv_heads, D, group, d)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale  # (kv_heads, D, group, L)
        if meta.decode_valid is not None:
            scores.masked_fill_(~meta.decode_valid[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # (kv_heads, D, group, d)
        return out.transpose(0, 1).reshape(decodes, heads, dim)

    @staticmethod
    def _decode_staged(q, k, v, cache: LayerCache, stage: DecodeStage, scale: float) -> torch.Tensor:
        """(D, heads, d) queries with their new (D, kv_heads, d) keys/values -> (D, heads, d), over the
        staging rows; rows without a decode this step are computed and thrown away."""
        assert cache.stage_k is not None and cache.stage_v is not None
        stage_k, stage_v = cache.stage_k, cache.stage_v
        decodes, heads, dim = q.shape
        kv_heads = k.shape[1]
        for row, blocks in stage.fills:
            columns = blocks.numel() * cache.k.shape[2]
            stage_k[row, :, :columns] = cache.k.index_select(1, blocks).view(kv_heads, columns, dim)
            stage_v[row, :, :columns] = cache.v.index_select(1, blocks).view(kv_heads, columns, dim)
        stage_k[stage.rows, :, stage.positions] = k
        stage_v[stage.rows, :, stage.positions] = v
        rows, length = stage.valid.shape
        keys, values = stage_k[:rows, :, :length], stage_v[:rows, :, :length]  # (R, kv_heads, L, d)
        group = heads // kv_heads
        queries = q.new_zeros(rows, kv_heads, group, dim)
        queries[stage.rows] = q.view(decodes, kv_heads, group, dim)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale  # (R, kv_heads, group, L)
        scores.masked_fill_(~stage.valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # (R, kv_heads, group, d)
        return out[stage.rows].reshape(decodes, heads, dim)


class FlashAttention:
    name = "flash_attn"

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, block_size, kv_heads, head_dim)

    def __call__(self, q, k, v, cache: LayerCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        k_cache, v_cache = cache.k, cache.v
        _, _, kv_heads, dim = k_cache.shape
        k_cache.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, dim).index_copy_(0, meta.slot_mapping, v)
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


def make_backend(name: str):
    return {"sdpa": SdpaAttention, "flash_attn": FlashAttention}[name]()
