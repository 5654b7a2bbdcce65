"""Each attention backend builds its own metadata from a step's decodes and chunks (no model, no
flash-attn needed: FlashAttention only imports it when a step runs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_service.attention import FlashAttention, SdpaAttention, backend_block_size, make_backend
from llm_service.engine.scheduler import ScheduledSequence

BLOCK = 4
CPU = torch.device("cpu")


@dataclass(eq=False)
class FakeSeq:
    """What the metadata builders read of a sequence: its block table and token count."""

    block_table: list[int]
    num_tokens: int


def step():
    """One decode at token 9 (10 tokens of context) and two chunks: a fresh prompt of 5 tokens, and
    tokens [4, 7) of a prompt whose first block is cached."""
    decode = ScheduledSequence(FakeSeq([3, 7, 1], 10), start=9, num_tokens=1)
    fresh = ScheduledSequence(FakeSeq([5, 6], 5), start=0, num_tokens=5)
    cached = ScheduledSequence(FakeSeq([2, 0], 7), start=4, num_tokens=3)
    return [decode], [fresh, cached]


def test_sdpa_metadata_gathers_decode_blocks_and_masks_cached_context():
    decodes, chunks = step()
    meta = SdpaAttention(BLOCK, CPU).metadata(decodes, chunks)  # no staging: decodes gather blocks
    assert meta.slot_mapping.tolist() == [1 * 4 + 1, 20, 21, 22, 23, 24, 0, 1, 2]
    assert meta.num_decodes == 1 and meta.stage is None
    assert meta.decode_blocks is not None and meta.decode_blocks.tolist() == [3, 7, 1]
    assert meta.decode_valid is not None and meta.decode_valid.sum().item() == 10
    fresh, cached = meta.prefills
    assert (fresh.q_start, fresh.q_len, fresh.ctx_blocks, fresh.mask) == (1, 5, None, None)
    assert (cached.q_start, cached.q_len) == (6, 3)
    assert cached.ctx_blocks is not None and cached.ctx_blocks.tolist() == [2, 0]
    assert cached.mask is not None and cached.mask.sum(dim=1).tolist() == [5, 6, 7]  # causal over 0..6


def test_sdpa_owns_decode_staging_when_it_has_a_budget():
    staged = SdpaAttention(BLOCK, CPU, staging_bytes=1 << 20)
    layers = staged.allocate(num_layers=2, num_blocks=8, kv_heads=2, head_dim=4, dtype=torch.float32)
    assert staged.staging is not None and staged.staging.layers is layers
    decodes, chunks = step()
    meta = staged.metadata(decodes, chunks)
    assert meta.stage is not None and meta.decode_blocks is None
    plain = SdpaAttention(BLOCK, CPU)
    plain.allocate(num_layers=2, num_blocks=8, kv_heads=2, head_dim=4, dtype=torch.float32)
    assert plain.staging is None


def test_flash_metadata_has_block_tables_and_cumulative_lengths():
    decodes, chunks = step()
    meta = FlashAttention(BLOCK, CPU).metadata(decodes, chunks)
    assert meta.slot_mapping.tolist() == [5, 20, 21, 22, 23, 24, 0, 1, 2]
    assert meta.block_tables.tolist() == [[3, 7, 1], [5, 6, 0], [2, 0, 0]]
    assert meta.context_lens.tolist() == [10, 5, 7]
    assert (meta.num_decodes, meta.num_chunks) == (1, 2)
    assert meta.cu_seqlens_q is not None and meta.cu_seqlens_q.tolist() == [0, 5, 8]
    assert meta.cu_seqlens_k is not None and meta.cu_seqlens_k.tolist() == [0, 5, 12]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (5, 7)


def test_each_backend_lays_out_its_own_cache():
    sdpa = make_backend("sdpa", BLOCK, CPU)
    flash = make_backend("flash_attn", 256, CPU)
    assert isinstance(sdpa, SdpaAttention) and isinstance(flash, FlashAttention)
    assert sdpa.allocate(1, 8, 2, 4, torch.float32)[0].k.shape == (2, 8, BLOCK, 4)
    assert flash.allocate(1, 8, 2, 4, torch.float32)[0].k.shape == (8, 256, 2, 4)
    assert (backend_block_size("sdpa", 16), backend_block_size("flash_attn", 16)) == (16, 256)
