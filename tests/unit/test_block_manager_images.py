"""BlockManager: image embeddings, grids and offsets in the prefix-cache block hash."""

from __future__ import annotations

import torch

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.sequence import Sequence
from tests.block_manager_fixtures import BLOCK, IMG, admit, pixels, seq, span

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
