"""BlockManager: paged KV blocks, ref counts, and the prefix cache of full blocks (no model)."""

from __future__ import annotations

import zlib

import pytest
import torch

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.sequence import Sequence, image_keys
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

BLOCK = 4
IMG = 99  # image placeholder id


def pixels(name: str, length: int = BLOCK) -> torch.Tensor:
    """A stand-in embedding of the image called `name` (other names give other values)."""
    return torch.randn(length, 8, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def span(offset: int, length: int = BLOCK, content_hash: str = "cat", **kw) -> ImageSpan:
    # By default the embedding is the named image's: the prefix cache keys by embedding bytes.
    embedding = kw.pop("embedding", None)
    embedding = pixels(content_hash or "anonymous", length) if embedding is None else embedding
    return ImageSpan(offset=offset, embedding=embedding, content_hash=content_hash, length=length, **kw)


def seq(token_ids: list[int], images: tuple[ImageSpan, ...] = ()) -> Sequence:
    request = GenerateRequest("r", list(token_ids), list(images), SamplingParams())
    return Sequence(request, image_keys(request))


def admit(manager: BlockManager, s: Sequence) -> None:
    """Allocate `s` after its cached prefix, compute its whole prompt and register its full blocks."""
    cached = manager.cached_prefix(s)
    assert manager.allocate(s, s.num_tokens - len(cached) * BLOCK, cached)
    s.num_computed_tokens = s.num_tokens
    manager.register_full_blocks(s)


def ref_counts(manager: BlockManager) -> list[int]:
    return [b.ref_count for b in manager.blocks]


def free_order(manager: BlockManager) -> list[int]:
    return list(manager._free)  # the eviction order is what these tests are about


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


# ---- images in the block hash -------------------------------------------------------------------

PROMPT = [1, 2, IMG, IMG, IMG, IMG, 3, 4, 5]  # the image covers tokens 2..5, across blocks 0 and 1


def shared_blocks(first: Sequence, second: Sequence) -> int:
    manager = BlockManager(16, BLOCK)
    admit(manager, first)
    return len(manager.cached_prefix(second))


def test_same_token_ids_with_other_image_content_share_nothing():
    assert (
        shared_blocks(
            seq(PROMPT, (span(2, content_hash="cat"),)), seq(PROMPT, (span(2, content_hash="dog"),))
        )
        == 0
    )


def test_same_content_hash_with_other_embedding_bytes_shares_nothing():
    # Prefix-cache poisoning: garbage embeddings sent under a real image's content hash must not
    # find (or later serve) that image's KV. The hash is the caller's claim; the bytes are the truth.
    real = seq(PROMPT, (span(2, content_hash="cat", embedding=pixels("cat")),))
    garbage = seq(PROMPT, (span(2, content_hash="cat", embedding=pixels("garbage")),))
    assert shared_blocks(real, garbage) == 0
    assert shared_blocks(garbage, real) == 0


def test_same_embedding_under_other_content_hashes_shares():
    # The same embedding is the same prompt, whatever the caller names it.
    first = seq(PROMPT, (span(2, content_hash="cat", embedding=pixels("cat")),))
    second = seq(PROMPT, (span(2, content_hash="feline", embedding=pixels("cat")),))
    assert shared_blocks(first, second) == 2


def test_an_embedding_in_another_dtype_shares_nothing():
    first = seq(PROMPT, (span(2, embedding=pixels("cat")),))
    second = seq(PROMPT, (span(2, embedding=pixels("cat").to(torch.bfloat16)),))
    assert shared_blocks(first, second) == 0


def test_same_content_hash_with_another_grid_shares_nothing():
    first = seq(PROMPT, (span(2, content_hash="cat", grid_thw=(1, 2, 2)),))
    second = seq(PROMPT, (span(2, content_hash="cat", grid_thw=(1, 4, 1)),))
    assert shared_blocks(first, second) == 0


def test_the_image_digest_only_reaches_the_blocks_it_overlaps():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, IMG, IMG, IMG, IMG, 9]
    first = seq(prompt, (span(8, content_hash="cat"),))
    second = seq(prompt, (span(8, content_hash="dog"),))
    assert shared_blocks(first, second) == 2


def test_an_image_starting_elsewhere_in_the_block_is_not_shared():
    # Same token ids, same image; only where the image starts inside block 1 differs (4 vs 5).
    prompt = [1, 2, 3, 4, IMG, IMG, IMG, IMG, IMG, 6]
    first = seq(prompt, (span(4),))
    second = seq(prompt, (span(5),))
    assert shared_blocks(first, second) == 1


def test_with_or_without_a_content_hash_the_embedding_bytes_name_the_image():
    def keyed_by(embedding: torch.Tensor) -> Sequence:
        return seq(PROMPT, (span(2, content_hash="", embedding=embedding),))

    base = torch.arange(32, dtype=torch.float32).view(4, 8)
    assert shared_blocks(keyed_by(base), keyed_by(base.clone())) == 2
    other = base.clone()
    other[3, 7] += 1
    assert shared_blocks(keyed_by(base), keyed_by(other)) == 0


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
