"""BlockManager: paged KV blocks, ref counts, prefix sharing and counters (no model)."""

from __future__ import annotations

import pytest

from llm_service.engine.block_manager import BlockManager
from tests.block_manager_fixtures import BLOCK, admit, free_order, ref_counts, seq

# ---- allocation and ref counts ----------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "blocks"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_rounds_up_to_whole_blocks(tokens, blocks):
    assert BlockManager(8, BLOCK).blocks_needed(tokens) == blocks


def test_allocate_takes_blocks_from_the_front_and_free_returns_them():
    manager = BlockManager(8, BLOCK)
    s = seq(list(range(10)))
    assert manager.allocate(s, 10)
    assert s.block_table == [0, 1, 2]
    assert ref_counts(manager) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert manager.num_free_blocks == 5
    manager.free(s)
    assert s.block_table == [] and s.block_hashes == []
    assert ref_counts(manager) == [0] * 8
    assert manager.num_free_blocks == 8


def test_a_growing_sequence_gets_a_new_block_only_when_its_last_one_is_full():
    manager = BlockManager(8, BLOCK)
    s = seq(list(range(6)))
    assert manager.allocate(s, 6)
    s.num_computed_tokens = 6
    assert manager.allocate(s, 2)  # tokens 6, 7: still block 1
    assert s.block_table == [0, 1]
    s.num_computed_tokens = 8
    assert manager.allocate(s, 1)  # token 8 opens block 2
    assert s.block_table == [0, 1, 2]


def test_failed_allocation_changes_nothing():
    manager = BlockManager(3, BLOCK)
    holder = seq(list(range(8)))
    assert manager.allocate(holder, 8)
    s = seq(list(range(100, 110)))
    assert not manager.allocate(s, 10)  # 3 blocks needed, 1 free
    assert s.block_table == [] and s.num_computed_tokens == 0
    assert ref_counts(manager) == [1, 1, 0]
    assert free_order(manager) == [2]
    assert (manager.prefix_queries, manager.prefix_hits) == (8, 0)


def test_failed_allocation_with_a_cached_prefix_revives_nothing():
    manager = BlockManager(4, BLOCK)
    first = seq(list(range(9)))
    admit(manager, first)  # blocks 0, 1 full and cached; block 2 holds token 8
    manager.free(first)
    hog = seq(list(range(200, 204)))
    assert manager.allocate(hog, 4)  # takes block 3: free is now [2, 1, 0]
    again = seq(list(range(8)) + list(range(50, 60)))  # 18 tokens: 2 cached blocks + 3 new
    cached = manager.cached_prefix(again)
    assert cached == [0, 1]
    before = (free_order(manager), ref_counts(manager), dict(manager._cached))
    assert not manager.allocate(again, again.num_tokens - 8, cached)
    assert (free_order(manager), ref_counts(manager), dict(manager._cached)) == before
    assert again.block_table == [] and again.num_computed_tokens == 0
    assert manager.cached_prefix(again) == [0, 1]


# ---- prefix sharing ---------------------------------------------------------------------------


def test_sequences_with_the_same_full_blocks_share_them():
    manager = BlockManager(8, BLOCK)
    first = seq(list(range(10)))
    admit(manager, first)
    second = seq(list(range(8)) + [70, 71, 72])
    admit(manager, second)
    assert second.block_table[:2] == first.block_table[:2] == [0, 1]
    assert second.block_table[2] not in first.block_table
    assert [manager.blocks[b].ref_count for b in (0, 1)] == [2, 2]
    assert second.num_computed_tokens == 11  # admit() computed the rest
    assert second.block_hashes[:2] == first.block_hashes[:2]


def test_cached_prefix_starts_computing_after_the_shared_blocks():
    manager = BlockManager(8, BLOCK)
    admit(manager, seq(list(range(10))))
    second = seq(list(range(8)) + [70, 71, 72])
    cached = manager.cached_prefix(second)
    assert manager.allocate(second, 3, cached)
    assert second.num_computed_tokens == 8
    assert len(second.block_table) == 3


def test_nothing_is_shared_before_the_first_sequence_registers_its_blocks():
    manager = BlockManager(8, BLOCK)
    first = seq(list(range(10)))
    assert manager.allocate(first, 10)
    assert manager.cached_prefix(seq(list(range(10)))) == []
    first.num_computed_tokens = 10
    manager.register_full_blocks(first)
    assert manager.cached_prefix(seq(list(range(10)))) == [0, 1]


def test_a_different_token_in_a_block_ends_the_shared_prefix_there():
    manager = BlockManager(8, BLOCK)
    admit(manager, seq(list(range(13))))
    changed = list(range(13))
    changed[5] = 500  # block 1
    assert manager.cached_prefix(seq(changed)) == [0]


@pytest.mark.parametrize(("length", "reused"), [(12, 2), (13, 3), (11, 2), (4, 0), (5, 1)])
def test_cached_prefix_leaves_the_last_token_to_compute(length, reused):
    manager = BlockManager(8, BLOCK)
    admit(manager, seq(list(range(16))))
    assert len(manager.cached_prefix(seq(list(range(length))))) == reused


def test_shared_blocks_are_freed_when_their_last_holder_lets_go():
    manager = BlockManager(8, BLOCK)
    first, second = seq(list(range(10))), seq(list(range(10)))
    admit(manager, first)
    admit(manager, second)
    assert second.block_table == [0, 1, 3]
    manager.free(first)
    assert ref_counts(manager)[:4] == [1, 1, 0, 1]
    assert manager.num_free_blocks == 5
    manager.free(second)
    assert manager.num_free_blocks == 8


# ---- counters, usage, switched off --------------------------------------------------------------


def test_prefix_counters_count_looked_up_and_found_prompt_tokens():
    manager = BlockManager(8, BLOCK)
    admit(manager, seq(list(range(10))))
    assert (manager.prefix_queries, manager.prefix_hits) == (10, 0)
    admit(manager, seq(list(range(8)) + [60, 61, 62, 63, 64]))
    assert (manager.prefix_queries, manager.prefix_hits) == (23, 8)
    admit(manager, seq([90, 91, 92]))
    assert (manager.prefix_queries, manager.prefix_hits) == (26, 8)


def test_usage_counts_held_blocks_and_not_cached_free_ones():
    manager = BlockManager(8, BLOCK)
    first = seq(list(range(10)))
    admit(manager, first)
    assert manager.usage() == pytest.approx(3 / 8)
    second = seq(list(range(10)))
    admit(manager, second)  # shares 2 blocks: one more held
    assert manager.usage() == pytest.approx(4 / 8)
    manager.free(first)
    manager.free(second)
    assert manager.usage() == 0.0
    assert manager.cached_prefix(seq(list(range(10)))) == [0, 1]


def test_with_prefix_caching_off_nothing_is_cached_or_shared():
    manager = BlockManager(8, BLOCK, enable_prefix_caching=False)
    first, second = seq(list(range(10))), seq(list(range(10)))
    admit(manager, first)
    admit(manager, second)
    assert set(first.block_table).isdisjoint(second.block_table)
    assert all(b.hash is None for b in manager.blocks)
    assert manager.cached_prefix(seq(list(range(10)))) == []
    assert manager.prefix_hits == 0
