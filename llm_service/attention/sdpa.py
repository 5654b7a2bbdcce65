"""The sdpa attention backend (CPU, and the GPU fallback): torch SDPA for prefill, batched matmuls for
decodes.

Cache layout (kv_heads, num_blocks, block_size, head_dim), so that gathering a sequence's blocks gives
each head's keys as one contiguous (tokens, head_dim) matrix. Decodes are one batched
matmul-softmax-matmul (GQA without repeating keys) over contiguous copies of their KV: either the
decode staging rows (llm_service/attention/sdpa_staging.py) or, when staging is off or over its memory
budget, the decodes' blocks gathered afresh into a reused workspace. Each prefill chunk is one torch
SDPA call.

Masked positions (a block's tail past a sequence's length, the block-0 padding of shorter decodes, a
staging row's columns past its length) hold whatever an earlier owner left there, NaN included. The
masks select them away (-inf scores), and their keys/values are zeroed in the copies attended to,
because a zero attention weight times a NaN value is NaN: nothing of another sequence's KV can leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llm_service.attention.paged import LayerCache, PagedAttention, slot_mapping
from llm_service.attention.sdpa_staging import DecodeStage, DecodeStaging
from mmserve.half_cpu import upcast_rows

if TYPE_CHECKING:
    from llm_service.engine.scheduler import ScheduledSequence

# Decode attention over at most this many key elements computes in float32 on CPUs without native
# half matmul (measured: 3.3M elements 5.0 -> 1.7 ms; 11M elements 17.6 -> 54 ms, the casts dominate)
UPCAST_ATTENTION_ELEMENTS = 4 << 20


@dataclass
class PrefillChunk:
    q_start: int  # first row of the chunk in the flat batch
    q_len: int
    ctx_blocks: torch.Tensor | None = None  # (n,) blocks of the context; None when the chunk is all of it
    mask: torch.Tensor | None = None  # (q_len, n * block_size) bool, True = attend; with ctx_blocks


@dataclass
class SdpaMetadata:
    slot_mapping: torch.Tensor  # (T,) cache slot (block * block_size + row) of each new token
    num_decodes: int = 0  # the first rows of the batch, one token each
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_blocks: torch.Tensor | None = None  # (D * n,) each decode's first n blocks, padded with block 0
    decode_valid: torch.Tensor | None = None  # (D, n * block_size) bool; None when every row is valid
    stage: DecodeStage | None = None  # decodes read the staging rows instead of gathering blocks


class SdpaAttention(PagedAttention[SdpaMetadata]):
    name = "sdpa"

    def __init__(self, block_size: int = 16, device: torch.device | None = None, staging_bytes: int = 0):
        super().__init__(block_size, device or torch.device("cpu"))
        self.staging_bytes = staging_bytes  # 0: decodes always gather their blocks
        self.staging: DecodeStaging | None = None  # made with the cache
        self._workspace: torch.Tensor | None = None  # reused gather buffer, grown on demand

    @staticmethod
    def cache_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (kv_heads, num_blocks, block_size, head_dim)

    def allocate(
        self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> list[LayerCache]:
        """The paged KV cache of every layer, and the decode staging over it."""
        layers = super().allocate(num_layers, num_blocks, kv_heads, head_dim, dtype)
        if self.staging_bytes > 0:
            self.staging = DecodeStaging(layers, self.block_size, self.staging_bytes)
        return layers

    def metadata(self, decodes: list[ScheduledSequence], chunks: list[ScheduledSequence]) -> SdpaMetadata:
        meta = SdpaMetadata(slot_mapping(decodes + chunks, self.block_size, self.device), len(decodes))
        meta.stage = self.staging.plan(decodes) if self.staging else None
        if decodes and meta.stage is None:
            meta.decode_blocks, meta.decode_valid = self._decode_blocks(decodes)
        row = len(decodes)
        for item in chunks:
            meta.prefills.append(self._prefill_chunk(item, row))
            row += item.num_tokens
        return meta

    def _decode_blocks(self, decodes: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each decode's blocks, padded to the longest with block 0, and which rows are real (None:
        all of them)."""
        size = self.block_size
        lengths = [d.end for d in decodes]
        width = -(-max(lengths) // size)
        blocks: list[int] = []
        for d in decodes:
            table = d.seq.block_table[:width]
            blocks.extend(table)
            blocks.extend([0] * (width - len(table)))
        valid = None
        if any(length != width * size for length in lengths):
            valid = torch.arange(width * size)[None, :] < torch.tensor(lengths)[:, None]  # (D, width * size)
            valid = valid.to(self.device)
        return torch.tensor(blocks, device=self.device), valid

    def _prefill_chunk(self, item: ScheduledSequence, row: int) -> PrefillChunk:
        chunk = PrefillChunk(row, item.num_tokens)
        if item.start > 0:  # it attends to cached tokens too
            num_blocks = -(-item.end // self.block_size)
            chunk.ctx_blocks = torch.tensor(item.seq.block_table[:num_blocks], device=self.device)
            q = torch.arange(item.start, item.end, device=self.device)[:, None]
            chunk.mask = torch.arange(num_blocks * self.block_size, device=self.device)[None, :] <= q
        return chunk

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

    def __call__(self, q, k, v, cache: LayerCache, meta: SdpaMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = cache.k, cache.v
        kv_heads, _, _, dim = k_cache.shape
        k_cache.view(kv_heads, -1, dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.view(kv_heads, -1, dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        n = meta.num_decodes
        if n == q.shape[0]:  # decodes only (most steps): their output is the layer's
            if meta.stage is not None:
                return _decode_staged(q, k, v, cache, meta.stage, scale)
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if n and meta.stage is not None:
            out[:n] = _decode_staged(q[:n], k[:n], v[:n], cache, meta.stage, scale)
        elif n:
            out[:n] = self._decode(q[:n], k_cache, v_cache, meta, scale)
        for chunk in meta.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], cache, chunk, scale)
        return out

    def _prefill(self, q, k, v, cache: LayerCache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
        """One chunk's (q_len, heads, d) queries over its context -> (q_len, heads, d)."""
        kv_heads, _, _, dim = cache.k.shape
        if chunk.ctx_blocks is None:
            ctx_k, ctx_v = k.transpose(0, 1), v.transpose(0, 1)  # (kv_heads, q_len, d)
        else:
            ctx_k, ctx_v = self._gather(cache.k, cache.v, chunk.ctx_blocks)
            ctx_k, ctx_v = ctx_k.view(kv_heads, -1, dim), ctx_v.view(kv_heads, -1, dim)
            assert chunk.mask is not None
            stale = ~chunk.mask[-1][None, :, None]  # the last query attends to all the context: (1, n, 1)
            ctx_k.masked_fill_(stale, 0)  # the workspace's copy: the last block's tail -> 0 (an additive
            ctx_v.masked_fill_(stale, 0)  # mask would turn a NaN key into a NaN score)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # (1, heads, q_len, d)
            ctx_k[None],
            ctx_v[None],
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=q.shape[1] != kv_heads,
        )
        return o[0].transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, meta: SdpaMetadata, scale: float) -> torch.Tensor:
        """One query per sequence: (D, heads, d) -> (D, heads, d)."""
        assert meta.decode_blocks is not None
        decodes, heads, dim = q.shape
        kv_heads = k_cache.shape[0]
        keys, values = self._gather(k_cache, v_cache, meta.decode_blocks)
        keys = keys.view(kv_heads, decodes, -1, dim)  # (kv_heads, D, L, d)
        values = values.view(kv_heads, decodes, -1, dim)
        if meta.decode_valid is not None:  # the workspace's copy: stale values past each length -> 0
            values.masked_fill_(~meta.decode_valid[None, :, :, None], 0)
        queries = q.view(decodes, kv_heads, heads // kv_heads, dim).transpose(0, 1)  # (kv_heads, D, group, d)
        keep = None if meta.decode_valid is None else meta.decode_valid[None, :, None, :]
        out = _grouped_attention(queries, keys, values, keep, scale)  # (kv_heads, D, group, d)
        return out.transpose(0, 1).reshape(decodes, heads, dim)


def write_staged(cache: LayerCache, stage: DecodeStage, k: torch.Tensor, v: torch.Tensor) -> None:
    """Bring this layer's staging rows up to date for the step: each fill's cached blocks copied into
    its row (stale columns zeroed), then each decode's new (D, kv_heads, d) key and value at its slots."""
    assert cache.stage_k is not None and cache.stage_v is not None
    stage_k, stage_v = cache.stage_k, cache.stage_v
    kv_heads, _, block_size, dim = cache.k.shape
    for row, blocks in stage.fills:
        columns = blocks.numel() * block_size
        stage_k[row, :, :columns] = cache.k.index_select(1, blocks).view(kv_heads, columns, dim)
        stage_v[row, :, :columns] = cache.v.index_select(1, blocks).view(kv_heads, columns, dim)
        # Past its length the row holds a block's stale tail or an earlier owner's tokens: zero them
        # once here, so that every row stays zero past its length (only the new tokens get written).
        stale = ~stage.valid[row][None, :, None]  # (1, L, 1)
        stage_k[row].masked_fill_(stale, 0)
        stage_v[row].masked_fill_(stale, 0)
    # float32 rows: see sdpa_staging. (D, kv_heads) slots index (D, kv_heads, d) keys as they are (no
    # reshape: a compiled step would specialize its viewability on a batch of 1)
    stage_k.view(-1, dim).index_put_((stage.slots,), k.to(stage_k.dtype))
    stage_v.view(-1, dim).index_put_((stage.slots,), v.to(stage_v.dtype))


def _decode_staged(q, k, v, cache: LayerCache, stage: DecodeStage, scale: float) -> torch.Tensor:
    """(D, heads, d) queries with their new (D, kv_heads, d) keys/values -> (D, heads, d), over the
    staging rows; rows without a decode this step are computed and thrown away."""
    write_staged(cache, stage, k, v)
    assert cache.stage_k is not None and cache.stage_v is not None
    stage_k, stage_v = cache.stage_k, cache.stage_v
    decodes, heads, dim = q.shape
    kv_heads = k.shape[1]
    rows = stage.valid.shape[0]  # its columns are all the allocated ones (sdpa_staging: kept dense)
    keys, values = stage_k.narrow(0, 0, rows), stage_v.narrow(0, 0, rows)  # (R, kv_heads, L, d), contiguous
    keep = stage.valid[:, None, None, :]
    # decode i is in row i, and no row is idle: no scatter, no gather. The compiled step
    # (llm_service/engine/compiled_decode.py) always scatters, where it costs little, so that one graph
    # serves both cases.
    if not torch.compiler.is_compiling() and stage.dense:
        out = _grouped_attention(q.view(decodes, kv_heads, heads // kv_heads, dim), keys, values, keep, scale)
        return out.reshape(decodes, heads, dim)
    queries = q.new_zeros(rows, kv_heads, heads // kv_heads, dim)  # (R, kv_heads, group, d)
    queries.index_copy_(0, stage.rows, q.view(decodes, kv_heads, heads // kv_heads, dim))
    out = _grouped_attention(queries, keys, values, keep, scale)
    return out.index_select(0, stage.rows).view(decodes, heads, dim)


def _grouped_attention(queries, keys, values, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention of (..., group, d) queries over (..., L, d) keys/values, the leading dims
    matching (GQA: a kv head's `group` query heads share its keys, never repeated); `keep`, broadcast to
    the (..., group, L) scores, is True where a key is attended -> (..., group, d) in the queries' dtype.
    Computed in the keys' dtype (float32 staging rows of a half model: see sdpa_staging)."""
    dtype = queries.dtype
    # (the size test last: in a compiled step it is a guard on the batch's shape)
    if keys.dtype == dtype and upcast_rows(dtype, keys.device) and keys.numel() <= UPCAST_ATTENTION_ELEMENTS:
        # half keys, no native half matmul on this CPU (mmserve.half_cpu): a small decode batch is
        # ~2.5x faster in float32 (1 x 680 keys x 8 heads: 0.54 -> 0.22 ms); a large one loses more to
        # the casts
        keys, values = keys.float(), values.float()
    # As batched matmuls over the flattened leading dims (views: each slice's rows are contiguous), not
    # broadcasting matmuls, whose shape checks a compiled step would turn into guards on size-1 dims.
    lead, (group, dim), length = queries.shape[:-2], queries.shape[-2:], keys.shape[-2]
    queries = queries.to(keys.dtype).reshape(-1, group, dim)
    scores = torch.bmm(queries, keys.reshape(-1, length, dim).transpose(1, 2)).float() * scale
    scores = scores.view(*lead, group, length)
    if keep is not None:
        scores.masked_fill_(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(-1, group, length)
    return torch.bmm(probs, values.reshape(-1, length, dim)).to(dtype).view(*lead, group, dim)
