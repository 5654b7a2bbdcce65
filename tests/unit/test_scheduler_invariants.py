"""Scheduler: randomized arrivals and aborts keep block ref counts and queues consistent (no model)."""

from __future__ import annotations

import collections
import random

import torch

from llm_service.engine.scheduler import SchedulerOutput
from llm_service.engine.sequence import Sequence, SequenceStatus
from mmserve.wire import ImageSpan
from tests.scheduler_fixtures import BLOCK, IMG, TOKEN, EngineLoop

# ---- randomized invariants --------------------------------------------------------------------


def check_invariants(engine: EngineLoop, plan: SchedulerOutput) -> None:
    manager, scheduler = engine.manager, engine.scheduler
    holders = collections.Counter(b for s in scheduler.running for b in s.block_table)
    assert [b.ref_count for b in manager.blocks] == [holders[b.block_id] for b in manager.blocks]
    assert set(manager._free) == {b.block_id for b in manager.blocks if b.ref_count == 0}
    assert len(manager._free) == manager.num_free_blocks
    for s in scheduler.running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) >= manager.blocks_needed(s.num_computed_tokens)
        assert len(set(s.block_table)) == len(s.block_table)
        for index, block_id in enumerate(s.block_table):
            block = manager.blocks[block_id]
            if holders[block_id] > 1:  # only a full, cached, computed block is shared
                assert block.hash is not None
                assert (index + 1) * BLOCK <= s.num_computed_tokens
            if block.hash is not None and index < len(s.block_hashes):
                assert block.hash == s.block_hashes[index]  # the block holds this sequence's tokens
    for s in scheduler.waiting:
        assert s.status is SequenceStatus.WAITING
        assert s.block_table == [] and s.num_computed_tokens == 0
    named = {b.hash: b.block_id for b in manager.blocks if b.hash is not None}
    assert manager._cached == named  # the prefix cache finds exactly the blocks that carry a hash
    assert len(scheduler.running) <= scheduler.max_num_seqs
    # max_num_seqs <= budget here, so every sequence still running was given tokens this step
    assert set(scheduler.running) <= {item.seq for item in plan.scheduled}


def random_request(rng: random.Random) -> tuple[list[int], list[ImageSpan]]:
    """Prompts drawn from a few shared stems (so the prefix cache hits), some with an image."""
    stem = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]][rng.randrange(2)]
    ids = stem[: rng.randint(0, len(stem))]
    images = []
    if rng.random() < 0.4:
        length = rng.randint(2, 6)
        images.append(ImageSpan(len(ids), torch.zeros(length, 4), rng.choice(["cat", "dog"]), length=length))
        ids = ids + [IMG] * length
    ids = ids + [rng.randint(20, 23) for _ in range(rng.randint(0, 8))]
    return ids or [1], images


def test_random_arrivals_and_aborts_keep_the_books_straight():
    rng = random.Random(0)
    engine = EngineLoop(num_blocks=10, max_num_seqs=4, budget=12)
    live: list[Sequence] = []
    aborted: list[Sequence] = []
    for step in range(400):
        if step < 300 and rng.random() < 0.35:
            ids, images = random_request(rng)
            live.append(engine.add(ids, max_new=rng.randint(1, 10), images=images))
        if rng.random() < 0.05:
            candidates = [s for s in live if not s.is_finished]
            if candidates:
                victim = rng.choice(candidates)
                engine.scheduler.finish(victim)
                aborted.append(victim)
                holders = collections.Counter(b for s in engine.scheduler.running for b in s.block_table)
                assert all(b.ref_count == holders[b.block_id] for b in engine.manager.blocks)
        plan = engine.step()
        check_invariants(engine, plan)
    engine.run()
    completed = [s for s in live if s not in aborted]
    assert len(completed) > 50 and engine.scheduler.num_preemptions > 0 and engine.manager.prefix_hits > 0
    assert all(s.output_token_ids == [TOKEN] * s.params.max_new_tokens for s in completed)
    assert engine.manager.num_free_blocks == engine.manager.num_blocks
