"""Scheduler: token budget, chunked prefill, FCFS admission, preemption and aborts (no model).

`EngineLoop` drives the scheduler the way the engine loop does, with a fixed fake sampled token.
"""

from __future__ import annotations

import collections
import random

import torch

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.scheduler import Scheduler, SchedulerOutput
from llm_service.engine.sequence import Sequence, SequenceStatus, image_keys
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

BLOCK = 4
TOKEN = 7  # what the fake model always samples
IMG = 99


class EngineLoop:
    """The engine loop without a model: schedule, update, sample TOKEN, finish at max_new_tokens."""

    def __init__(self, num_blocks=16, max_num_seqs=8, budget=32, prefix_caching=True):
        self.manager = BlockManager(num_blocks, BLOCK, prefix_caching)
        self.scheduler = Scheduler(self.manager, max_num_seqs, budget)
        self.finished: list[Sequence] = []
        self.num_added = 0
        self.sampled: list[Sequence] = []  # the sequences that sampled in the last step

    def add(self, token_ids: list[int], max_new: int = 4, images: list[ImageSpan] | None = None) -> Sequence:
        self.num_added += 1
        params = SamplingParams(max_new_tokens=max_new)
        request = GenerateRequest(f"r{self.num_added}", token_ids, images or [], params)
        s = Sequence(request, image_keys(request))
        self.scheduler.add(s)
        return s

    def step(self) -> SchedulerOutput:
        plan = self.scheduler.schedule()
        assert plan.num_tokens <= self.scheduler.max_num_batched_tokens
        self.scheduler.update(plan)
        # `samples` must be read before the append moves the sequence's end
        self.sampled = [item.seq for item in plan.scheduled if item.samples]
        for item in plan.scheduled:
            if item.seq in self.sampled:
                item.seq.append_token(TOKEN)
                if len(item.seq.output_token_ids) == item.seq.params.max_new_tokens:
                    self.scheduler.finish(item.seq)
                    self.finished.append(item.seq)
        return plan

    def run(self, max_steps: int = 1000) -> int:
        for steps in range(1, max_steps + 1):
            self.step()
            if not self.scheduler.has_work():
                return steps
        raise AssertionError(f"still working after {max_steps} steps")


def prompt(n: int, first: int = 1000) -> list[int]:
    return list(range(first, first + n))


def chunks(plan: SchedulerOutput) -> dict[Sequence, tuple[int, int]]:
    """Each scheduled sequence -> (start, num_tokens)."""
    return {item.seq: (item.start, item.num_tokens) for item in plan.scheduled}


# ---- budget and chunked prefill ---------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_and_samples_on_the_last_one():
    engine = EngineLoop(budget=8)
    s = engine.add(prompt(20))
    steps = [(chunks(engine.step())[s], engine.sampled) for _ in range(3)]
    assert steps == [((0, 8), []), ((8, 8), []), ((16, 4), [s])]
    assert s.output_token_ids == [TOKEN]
    assert s.num_computed_tokens == 20 and s.num_tokens == 21
    assert chunks(engine.step())[s] == (20, 1)


def test_the_budget_is_split_across_waiting_prompts_in_arrival_order():
    engine = EngineLoop(budget=10)
    a, b, c = engine.add(prompt(6)), engine.add(prompt(6, 2000)), engine.add(prompt(6, 3000))
    assert chunks(engine.step()) == {a: (0, 6), b: (0, 4)}
    assert list(engine.scheduler.waiting) == [c]
    assert chunks(engine.step()) == {a: (6, 1), b: (4, 2), c: (0, 6)}


def test_decodes_are_not_starved_by_a_long_prefill():
    engine = EngineLoop(budget=8, num_blocks=32)
    decoding = engine.add(prompt(3), max_new=20)
    engine.step()
    long = engine.add(prompt(40, 2000))
    long_chunks = []
    while not long.output_token_ids:
        plan = engine.step()
        assert chunks(plan)[decoding][1] == 1
        long_chunks.append(chunks(plan)[long][1])
    assert long_chunks == [7, 7, 7, 7, 7, 5]
    assert len(decoding.output_token_ids) == 7


def test_max_num_seqs_caps_the_running_batch():
    engine = EngineLoop(max_num_seqs=2)
    a, b, c = (engine.add(prompt(3, 1000 * i), max_new=2) for i in (1, 2, 3))
    assert set(chunks(engine.step())) == {a, b}
    assert set(chunks(engine.step())) == {a, b}  # a and b finish here
    assert engine.finished == [a, b]
    assert set(chunks(engine.step())) == {c}


# ---- first come, first served -----------------------------------------------------------------


def test_a_waiting_request_without_blocks_holds_back_those_behind_it():
    engine = EngineLoop(num_blocks=4, max_num_seqs=8)
    running = engine.add(prompt(8), max_new=3)  # 2 blocks, then a 3rd for its first output token
    engine.step()
    big, small = engine.add(prompt(13, 2000)), engine.add(prompt(2, 3000))  # 4 blocks; 1 block
    plan = engine.step()
    assert set(chunks(plan)) == {running}
    assert list(engine.scheduler.waiting) == [big, small]
    engine.step()  # running finishes and frees its 3 blocks
    assert running.is_finished
    assert set(chunks(engine.step())) == {big}
    assert list(engine.scheduler.waiting) == [small]


# ---- preemption -------------------------------------------------------------------------------


def preempting_engine(prefix_caching: bool) -> tuple[EngineLoop, Sequence, Sequence]:
    """4 blocks: `old` (8 tokens) and `new` (7 tokens) fill them in step 1; in step 2 old's first
    output token needs a 5th block, so new is preempted; old finishes in step 3."""
    engine = EngineLoop(num_blocks=4, prefix_caching=prefix_caching)
    old, new = engine.add(prompt(8), max_new=3), engine.add(prompt(7, 2000), max_new=3)
    engine.step()
    assert engine.manager.num_free_blocks == 0
    return engine, old, new


def test_the_newest_running_sequence_is_preempted_when_blocks_run_out():
    engine, old, new = preempting_engine(prefix_caching=True)
    plan = engine.step()
    assert plan.preempted == [new]
    assert chunks(plan) == {old: (8, 1)}
    assert new.status is SequenceStatus.WAITING and new.block_table == []
    assert new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert list(engine.scheduler.waiting) == [new] and engine.scheduler.running == [old]
    assert engine.scheduler.num_preemptions == 1
    assert new.output_token_ids == [TOKEN]  # what it generated is kept, to be recomputed


def test_a_prefill_chunk_without_blocks_preempts_itself_and_is_not_readmitted_in_that_step():
    engine = EngineLoop(num_blocks=4, budget=8, prefix_caching=False)
    old, new = engine.add(prompt(4), max_new=3), engine.add(prompt(12, 2000), max_new=1)
    assert chunks(engine.step()) == {old: (0, 4), new: (0, 4)}
    plan = engine.step()  # old takes a 3rd block; new's next 7 tokens need 2 more, 1 is left
    assert plan.preempted == [new] and chunks(plan) == {old: (4, 1)}
    assert engine.manager.num_free_blocks == 2  # enough for a 7-token chunk, yet nobody is admitted
    assert chunks(engine.step()) == {old: (5, 1), new: (0, 7)}  # old finishes
    assert chunks(engine.step()) == {new: (7, 5)}
    assert new.output_token_ids == [TOKEN] and not engine.scheduler.has_work()


def test_a_preempted_sequence_goes_to_the_front_of_the_queue():
    engine, old, new = preempting_engine(prefix_caching=True)
    late = engine.add(prompt(2, 5000))
    engine.step()
    assert list(engine.scheduler.waiting) == [new, late]


def test_a_preempted_sequence_recomputes_its_prompt_and_output_before_sampling_again():
    engine, old, new = preempting_engine(prefix_caching=False)
    engine.step()  # new is preempted
    plan = engine.step()  # old finishes; its blocks free only after the step
    assert chunks(plan) == {old: (9, 1)} and old.is_finished
    plan = engine.step()
    assert chunks(plan) == {new: (0, 8)}  # 7 prompt tokens + 1 output token
    assert engine.sampled == [new]
    assert new.output_token_ids == [TOKEN, TOKEN]
    engine.run()
    assert new.output_token_ids == [TOKEN] * 3
    assert new.num_cached_tokens == 0


def test_a_preempted_sequence_reuses_its_own_cached_blocks():
    engine, old, new = preempting_engine(prefix_caching=True)
    engine.step()
    engine.step()  # old finishes
    hits = engine.manager.prefix_hits
    plan = engine.step()
    assert chunks(plan) == {new: (4, 4)}  # block 0 (tokens 0..3) was cached before the preemption
    assert engine.manager.prefix_hits == hits + 4
    assert new.num_cached_tokens == 0  # only the first admission counts as cached prompt
    engine.run()
    assert new.output_token_ids == [TOKEN] * 3


def test_a_preempted_chunked_recompute_samples_only_at_its_last_chunk():
    engine, old, new = preempting_engine(prefix_caching=False)
    engine.step()  # new preempted
    engine.step()  # old finishes
    engine.scheduler.max_num_batched_tokens = 3  # from now on: the recompute takes 3 steps
    steps = [(chunks(engine.step())[new], engine.sampled) for _ in range(3)]
    assert steps == [((0, 3), []), ((3, 3), []), ((6, 2), [new])]
    assert new.output_token_ids == [TOKEN, TOKEN]


# ---- finishing and aborting -------------------------------------------------------------------


def test_aborting_a_running_sequence_frees_its_blocks_at_once():
    engine = EngineLoop(num_blocks=8)
    s = engine.add(prompt(10), max_new=10)
    engine.step()
    assert engine.manager.num_free_blocks == 5
    engine.scheduler.finish(s)
    assert engine.manager.num_free_blocks == 8
    assert s.status is SequenceStatus.FINISHED and s.block_table == []
    assert not engine.scheduler.has_work()


def test_aborting_a_sequence_in_mid_prefill_frees_its_blocks_at_once():
    engine = EngineLoop(num_blocks=8, budget=4)
    s = engine.add(prompt(20))
    engine.step()
    engine.step()
    assert engine.manager.num_free_blocks == 6
    engine.scheduler.finish(s)
    assert engine.manager.num_free_blocks == 8 and engine.manager.usage() == 0.0


def test_aborting_a_waiting_sequence_removes_it_from_the_queue():
    engine = EngineLoop(max_num_seqs=1)
    running, queued, behind = engine.add(prompt(3)), engine.add(prompt(3, 2000)), engine.add(prompt(3, 3000))
    engine.step()
    engine.scheduler.finish(queued)
    assert list(engine.scheduler.waiting) == [behind]
    assert queued.status is SequenceStatus.FINISHED
    engine.scheduler.finish(running)
    assert set(chunks(engine.step())) == {behind}


def test_aborting_a_preempted_sequence_leaves_all_blocks_free_when_nothing_else_runs():
    engine, old, new = preempting_engine(prefix_caching=True)
    engine.step()  # new preempted
    engine.scheduler.finish(new)
    engine.scheduler.finish(old)
    assert engine.manager.num_free_blocks == 4
    assert not engine.scheduler.has_work()


def test_usage_returns_to_zero_after_every_request_finishes():
    engine = EngineLoop(num_blocks=12, budget=8)
    requests = [engine.add(prompt(n, 1000 * n), max_new=m) for n, m in [(5, 3), (13, 2), (8, 6), (1, 1)]]
    engine.run()
    assert [len(s.output_token_ids) for s in requests] == [3, 2, 6, 1]
    assert engine.manager.usage() == 0.0
    assert engine.manager.num_free_blocks == 12


def test_num_cached_tokens_is_the_prefix_found_on_first_admission():
    engine = EngineLoop()
    first = engine.add(prompt(10))
    engine.run()
    second, third = engine.add(prompt(10)), engine.add(prompt(10, 5000))
    plan = engine.step()
    assert chunks(plan) == {second: (8, 2), third: (0, 10)}
    assert (first.num_cached_tokens, second.num_cached_tokens, third.num_cached_tokens) == (0, 8, 0)


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
