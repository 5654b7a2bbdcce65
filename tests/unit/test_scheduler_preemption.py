"""Scheduler: preemption when blocks run out, requeueing and recompute (no model)."""

from __future__ import annotations

from llm_service.engine.sequence import SequenceStatus
from tests.scheduler_fixtures import TOKEN, EngineLoop, chunks, preempting_engine, prompt

# ---- preemption -------------------------------------------------------------------------------


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
