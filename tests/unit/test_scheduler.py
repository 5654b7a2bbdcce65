"""Scheduler: token budget, chunked prefill, FCFS admission, finishing and aborts (no model)."""

from __future__ import annotations

import torch

from llm_service.engine.sequence import SequenceStatus
from mmserve.wire import ImageSpan
from tests.scheduler_fixtures import TOKEN, EngineLoop, chunks, preempting_engine, prompt

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


# ---- the same prompt arriving together -------------------------------------------------------


def test_a_prompt_whose_blocks_are_in_prefill_waits_for_them_and_others_go_ahead():
    engine = EngineLoop(budget=32)
    first, same, other = engine.add(prompt(10)), engine.add(prompt(10)), engine.add(prompt(10, 5000))
    assert chunks(engine.step()) == {first: (0, 10), other: (0, 10)}  # `same` would compute 8 tokens twice
    assert list(engine.scheduler.waiting) == [same]
    assert chunks(engine.step())[same] == (8, 2)  # first's two full blocks, from the cache
    assert (same.num_cached_tokens, engine.manager.prefix_hits) == (8, 8)


def test_a_chunked_prefill_is_waited_for_to_its_end_and_the_queue_keeps_its_order():
    engine = EngineLoop(budget=8, num_blocks=32)
    first = engine.add(prompt(22))
    second, third = engine.add(prompt(22)), engine.add(prompt(22))
    plans = [chunks(engine.step()) for _ in range(3)]
    assert plans == [{first: (0, 8)}, {first: (8, 8)}, {first: (16, 6)}]  # 2 tokens of budget left
    assert list(engine.scheduler.waiting) == [second, third]  # tokens 16-19 were in first's last chunk
    assert chunks(engine.step()) == {first: (22, 1), second: (20, 2), third: (20, 2)}
    assert (second.num_cached_tokens, third.num_cached_tokens) == (20, 20)


def test_a_shared_image_in_prefill_is_waited_for():
    image = [ImageSpan(1, torch.ones(6, 4), "a")]
    engine = EngineLoop(budget=32)
    first = engine.add(prompt(10), images=image)
    other_image = engine.add(prompt(10), images=[ImageSpan(1, torch.zeros(6, 4), "a")])
    same = engine.add(prompt(10), images=image)
    assert chunks(engine.step()) == {first: (0, 10), other_image: (0, 10)}
    assert chunks(engine.step())[same] == (8, 2)


def test_without_prefix_caching_nothing_waits():
    engine = EngineLoop(budget=32, prefix_caching=False)
    first, same = engine.add(prompt(10)), engine.add(prompt(10))
    assert chunks(engine.step()) == {first: (0, 10), same: (0, 10)}
