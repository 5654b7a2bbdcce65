"""BlockManager: freed blocks stay in the prefix cache until evicted, least recently freed first."""

from __future__ import annotations

from llm_service.engine.block_manager import BlockManager
from tests.block_manager_fixtures import BLOCK, admit, free_order, ref_counts, seq

# ---- freed blocks stay cached until reused ------------------------------------------------------


def test_freed_blocks_stay_cached_and_are_revived_on_a_hit():
    manager = BlockManager(8, BLOCK)
    first = seq(list(range(10)))
    admit(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 8
    second = seq(list(range(10)))
    admit(manager, second)
    assert second.block_table[:2] == [0, 1]
    assert ref_counts(manager)[:2] == [1, 1]
    assert manager.num_free_blocks == 5
    assert second.num_computed_tokens == 10


def test_eviction_takes_the_least_recently_freed_block_first_and_a_tail_before_its_head():
    manager = BlockManager(6, BLOCK)
    first = seq(list(range(13)))
    admit(manager, first)  # blocks 0, 1, 2 full and cached, block 3 holds token 12
    manager.free(first)
    assert free_order(manager) == [4, 5, 3, 2, 1, 0]
    again = seq(list(range(13)))
    assert manager.cached_prefix(again) == [0, 1, 2]

    other = seq(list(range(100, 112)))
    assert manager.allocate(other, 12)  # never used 4, 5, then 3 (no hash)
    assert other.block_table == [4, 5, 3]
    assert manager.cached_prefix(again) == [0, 1, 2]

    assert manager.allocate(seq(list(range(200, 204))), 4)  # the tail block 2 goes first
    assert manager.blocks[2].hash is None
    assert manager.cached_prefix(again) == [0, 1]
    assert manager.allocate(seq(list(range(300, 304))), 4)
    assert manager.cached_prefix(again) == [0]


def test_a_revived_block_freed_again_becomes_the_most_recently_freed():
    manager = BlockManager(4, BLOCK)
    a, b = seq(list(range(5))), seq(list(range(100, 105)))
    admit(manager, a)  # blocks 0 (cached), 1
    admit(manager, b)  # blocks 2 (cached), 3
    manager.free(a)
    manager.free(b)
    assert free_order(manager) == [1, 0, 3, 2]
    a_again = seq(list(range(5)))
    admit(manager, a_again)  # revives 0, takes 1
    manager.free(a_again)
    assert free_order(manager) == [3, 2, 1, 0]
    assert manager.allocate(seq(list(range(500, 508))), 8)  # takes 3 then 2: b's block is evicted
    assert manager.cached_prefix(seq(list(range(100, 105)))) == []
    assert manager.cached_prefix(seq(list(range(5)))) == [0]


def test_a_block_computed_twice_is_cached_once_and_the_copy_stays_unnamed():
    manager = BlockManager(8, BLOCK)
    first, second = seq(list(range(5))), seq(list(range(5)))
    assert manager.allocate(first, 5) and manager.allocate(second, 5)  # both before either registers
    for s in (first, second):
        s.num_computed_tokens = 5
        manager.register_full_blocks(s)
    assert manager.blocks[first.block_table[0]].hash is not None
    assert manager.blocks[second.block_table[0]].hash is None
    assert second.block_hashes == first.block_hashes
    assert manager.cached_prefix(seq(list(range(5)))) == [first.block_table[0]]
