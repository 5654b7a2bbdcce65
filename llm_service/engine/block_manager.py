"""Paged KV cache bookkeeping: fixed-size blocks, ref counts, and a prefix cache of full blocks.

Pure logic over block ids and token counts; the tensors live in the model runner. A full block is
named by a hash chained over every token before it (image tokens by their image's digest), so two
sequences share a block exactly when everything up to its end is the same. Freed blocks keep their
hash and stay findable until they are reused, least recently freed first.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

from llm_service.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered in the prefix cache


def chain_hash(parent: bytes | None, key: bytes) -> bytes:
    return hashlib.sha256((parent or b"root") + key).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first: allocation takes (and evicts) from the front.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---- facts ------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (at least one token is left to compute,
        so the last prompt position still yields logits)."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        for index in range((seq.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(self.block_hash(seq, index))
            if block_id is None:
                break
            found.append(block_id)
        return found

    def block_hash(self, seq: Sequence, index: int) -> bytes:
        """The chained hash of full block `index` of `seq` (computed once per sequence and block: a
        sequence's tokens only grow)."""
        chain = seq.chain_hashes
        while len(chain) <= index:
            parent = chain[-1] if chain else None
            chain.append(chain_hash(parent, seq.block_key(len(chain), self.block_size)))
        return chain[index]

    def next_prompt_block(self, seq: Sequence, num_cached_blocks: int) -> bytes | None:
        """The hash of the block a sequence with `num_cached_blocks` cached would compute first, when
        that is a full block the prefix cache could give it (None otherwise)."""
        if not self.enable_prefix_caching or num_cached_blocks >= (seq.num_tokens - 1) // self.block_size:
            return None
        return self.block_hash(seq, num_cached_blocks)

    def uncomputed_prompt_blocks(self, seq: Sequence) -> list[bytes]:
        """Hashes of the full prompt blocks of `seq` whose KV is not computed yet."""
        if not self.enable_prefix_caching:
            return []
        first = seq.num_computed_tokens // self.block_size
        return [self.block_hash(seq, i) for i in range(first, seq.num_prompt_tokens // self.block_size)]

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of `seq` that its computed tokens have filled since the last call."""
        num_full = seq.num_computed_tokens // self.block_size
        while len(seq.block_hashes) < num_full:
            index = len(seq.block_hashes)
            block_hash = self.block_hash(seq, index)
            seq.block_hashes.append(block_hash)
            if not self.enable_prefix_caching:
                continue
            block = self.blocks[seq.block_table[index]]
            if block.hash is None and block_hash not in self._cached:
                block.hash = block_hash
                self._cached[block_hash] = block.block_id

    # ---- allocation -------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens, taking `cached` (from cached_prefix) as
        its first blocks when it has none. False (and nothing changes) when the blocks are not there."""
        cached = cached or []
        assert not cached or not seq.block_table, "cached prefix blocks only go to a sequence without blocks"
        num_computed = len(cached) * self.block_size if cached else seq.num_computed_tokens
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # free blocks the prefix takes
        if needed > len(self._free) - revived:
            return False
        for block_id in cached:
            self._take(block_id)
        if cached or (not seq.block_table and seq.num_computed_tokens == 0):
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(cached) * self.block_size
            seq.block_table = list(cached)
            seq.block_hashes = [self.blocks[b].hash for b in cached]  # type: ignore[misc]
            seq.num_computed_tokens = num_computed
        for _ in range(max(needed, 0)):
            block_id = next(iter(self._free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; the tail goes to the free queue first (evicted first)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        """Forget a free block's cached content before it is overwritten."""
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
