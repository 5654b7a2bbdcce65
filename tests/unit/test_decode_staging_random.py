"""Decode staging's bookkeeping against a plain reference, over thousands of random steps.

No model: one layer's paged cache holds a distinct value per (sequence, token); every step a random set
of sequences decodes one token (new ones join with random prompt lengths, others finish or are aborted
mid-way), the staging plan is applied the way the sdpa backend applies it (fills, then the new token),
and every decoding row must then hold exactly its sequence's tokens [0, end). The flood-then-long-decodes
shape that broke the service (many rows, a compaction, then few rows that keep growing) is also driven
explicitly.
"""

from __future__ import annotations

import random

import torch

from llm_service.attention import LayerCache
from llm_service.attention.sdpa import write_staged
from llm_service.attention.sdpa_staging import DecodeStaging
from llm_service.engine.scheduler import ScheduledSequence

BLOCK = 4
KV_HEADS, DIM = 2, 3


class FakeSeq:
    """What DecodeStaging reads of a sequence: its block table (hashed by identity)."""

    def __init__(self, ident: int, free_blocks: list[int]):
        self.ident = ident
        self.block_table: list[int] = []
        self.length = 0
        self.free_blocks = free_blocks

    def token_value(self, index: int) -> float:
        return self.ident * 10_000 + index + 1  # never 0: zeros are what unfilled staging holds

    def append(self, cache: LayerCache) -> None:
        """Write token `length` into the paged cache, taking a new block when needed."""
        if self.length % BLOCK == 0:
            self.block_table.append(self.free_blocks.pop())
        block, slot = self.block_table[self.length // BLOCK], self.length % BLOCK
        cache.k[:, block, slot] = self.token_value(self.length)
        cache.v[:, block, slot] = -self.token_value(self.length)
        self.length += 1


def apply(cache: LayerCache, stage, decodes: list[ScheduledSequence]) -> None:
    """The sdpa backend's staging writes (llm_service/attention/sdpa.py: write_staged): fills, then each
    decode's new token, whose key is its token value and whose value is minus that."""
    assert cache.stage_k is not None
    length = cache.stage_k.shape[2]
    for d, row, slots in zip(decodes, stage.rows.tolist(), stage.slots.tolist(), strict=True):
        assert [divmod(slot, length) for slot in slots] == [
            (row * KV_HEADS + h, d.start) for h in range(KV_HEADS)
        ]
    new = torch.tensor([d.seq.token_value(d.start) for d in decodes])[:, None, None].expand(-1, KV_HEADS, DIM)
    write_staged(cache, stage, new, -new)


def check(cache: LayerCache, stage, decodes: list[ScheduledSequence]) -> None:
    """Every decoding row holds exactly its sequence's tokens [0, end), and attends to those only."""
    assert cache.stage_k is not None and cache.stage_v is not None
    for d, row in zip(decodes, stage.rows.tolist(), strict=True):
        expected = torch.tensor([d.seq.token_value(i) for i in range(d.end)])
        assert torch.equal(cache.stage_k[row, 0, : d.end, 0], expected), f"row {row} of seq {d.seq.ident}"
        assert torch.equal(cache.stage_v[row, 1, : d.end, 2], -expected)
        assert stage.valid[row, : d.end].all() and not stage.valid[row, d.end :].any()


class World:
    """A paged cache (the sdpa layout: kv_heads, blocks, block, d), its staging, and live sequences."""

    def __init__(self, seed: int, max_bytes: int = 1 << 30, num_blocks: int = 4096):
        self.rng = random.Random(seed)
        k = torch.zeros(KV_HEADS, num_blocks, BLOCK, DIM)
        self.cache = LayerCache(k=k, v=torch.zeros_like(k))
        self.free = list(range(num_blocks))
        self.staging = DecodeStaging([self.cache], BLOCK, max_bytes)
        self.live: list[FakeSeq] = []
        self.next_id = 1

    def join(self, prompt_len: int) -> FakeSeq:
        seq = FakeSeq(self.next_id, self.free)
        self.next_id += 1
        for _ in range(prompt_len):
            seq.append(self.cache)
        self.live.append(seq)
        return seq

    def leave(self, seq: FakeSeq) -> None:
        self.live.remove(seq)
        self.free.extend(seq.block_table)

    def step(self, decoding: list[FakeSeq]) -> bool:
        """One decode step of `decoding`; False when staging fell back (over its budget)."""
        decodes = [ScheduledSequence(s, s.length, 1) for s in decoding]  # type: ignore[arg-type]
        stage = self.staging.plan(decodes)
        for s in decoding:
            s.append(self.cache)
        if stage is None:
            return False
        apply(self.cache, stage, decodes)
        check(self.cache, stage, decodes)
        return True


def test_flood_then_few_long_decodes():
    """The failing shape: 66 rows in use, all but one leave (a compaction), then the survivor's length
    grows past the allocated columns: the buffers must grow without shrinking their rows."""
    world = World(seed=0)
    flood = [world.join(3) for _ in range(66)]
    for _ in range(5):
        assert world.step(flood)
    for seq in flood[1:]:
        world.leave(seq)
    survivor = flood[0]
    rows_before = world.staging.num_rows
    for _ in range(200):  # far past the columns the flood allocated
        assert world.step([survivor])
    assert world.staging.num_rows >= rows_before
    assert world.staging.length >= survivor.length


def test_random_grow_shrink_abort_against_reference():
    for seed in range(6):  # 6 x 300 steps
        world = World(seed)
        rng = world.rng
        for _ in range(300):
            if not world.live or (rng.random() < 0.3 and len(world.live) < 48):  # arrivals, some bursts
                for _ in range(rng.choice([1, 1, 2, 8, 40])):
                    world.join(rng.randint(1, 3 * BLOCK))
            for seq in list(world.live):  # finished, aborted or preempted: the row is given back
                if rng.random() < 0.05:
                    world.leave(seq)
            decoding = [s for s in world.live if rng.random() < 0.8]
            if decoding:
                assert world.step(decoding)


def test_budget_fallback_then_recovery():
    """Past max_bytes a step falls back to gathering; later small steps stage again, correctly."""
    small = 2 * 1 * 8 * KV_HEADS * 16 * BLOCK * DIM * 4  # room for about 8 rows of 16 blocks
    world = World(seed=3, max_bytes=small)
    crowd = [world.join(BLOCK) for _ in range(40)]
    assert not world.step(crowd)  # does not fit: gather instead
    for seq in crowd[2:]:
        world.leave(seq)
    for _ in range(20):
        assert world.step(crowd[:2])
