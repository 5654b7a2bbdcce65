"""The sdpa backend's decode staging: a contiguous copy of each decoding sequence's KV, so a decode
step reads one dense (rows, kv_heads, length, head_dim) buffer per layer instead of gathering every
sequence's whole context from the paged cache (which cost more than the rest of a decode step on CPU).

A row is handed to a sequence when it starts decoding, filled from the paged cache then (and again
whenever the row does not already hold the sequence's tokens before this step: after a preemption or
a compaction), and grows by the one new token of each step. A fill also zeroes the row past the
sequence's length (stale tokens of an earlier owner; the sdpa backend's docstring says why). A sequence's row is taken back at the
first step it does not decode in (finished, aborted, preempted, or back in prefill). The paged cache
stays the source of truth (prefix sharing, preemption).

On a CPU without native half-precision matmul (mmserve.half_cpu) the rows of a bf16/fp16 cache are
kept in float32: decode attention computes in float32 there anyway, and casting every layer's staged
KV at every step cost more than the attention itself (fresh float32 copies of the keys and values);
now only each step's new token is cast. The memory budget is in bytes, so half as many tokens fit.

The buffers grow (rows by doubling, at most 64 past what the step needs; columns by a quarter),
keeping their content; when most rows are idle the row assignment is compacted (every decode gets a
low row again and is refilled from the cache), so a step attends over few rows although the
allocation stays. A step that would need more than `max_bytes` frees the buffers: its decodes gather
their blocks instead, and the next step starts staging afresh (every row refilled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llm_service.attention.paged import LayerCache
from mmserve.half_cpu import upcast_rows

if TYPE_CHECKING:
    from llm_service.engine.scheduler import ScheduledSequence
    from llm_service.engine.sequence import Sequence


@dataclass
class DecodeStage:
    """This step's use of the staging rows."""

    rows: torch.Tensor  # (D,) the row of each decode
    slots: torch.Tensor  # (D, kv_heads) where each decode's new key goes per kv head (its row, the head,
    # the token's index in the row), in a layer's staging buffer viewed as (rows * kv_heads * length, d)
    fills: list[tuple[int, torch.Tensor]]  # (row, blocks): copy these cached blocks into the row first
    valid: torch.Tensor  # (R, L) bool: the rows and columns attended; R rows, L columns in use
    dense: bool = False  # decode i is in row i, and R == D (no idle row)


class DecodeStaging:
    def __init__(self, layers: list[LayerCache], block_size: int, max_bytes: int):
        self.layers = layers
        self.block_size = block_size
        self.max_bytes = max_bytes
        cache = layers[0].k
        self.dtype = torch.float32 if upcast_rows(cache.dtype, cache.device) else cache.dtype
        self.rows: dict[Sequence, int] = {}
        self.staged: dict[Sequence, int] = {}  # tokens of the sequence already in its row
        self.num_rows = 0  # allocated rows
        self.length = 0  # allocated columns
        self.peak_rows = 0
        self.fallbacks = 0  # steps whose decodes gathered blocks because staging did not fit

    def plan(self, decodes: list[ScheduledSequence]) -> DecodeStage | None:
        """Rows for this step's decodes (in their order), or None when staging would not fit."""
        active = {d.seq for d in decodes}
        for seq in [s for s in self.rows if s not in active]:
            del self.rows[seq], self.staged[seq]
        if not decodes:
            return None
        fills = self._assign(decodes)
        num_rows = max(self.rows.values()) + 1
        length = -(-max(d.end for d in decodes) // self.block_size) * self.block_size
        if not self._reserve(num_rows, length):
            self.rows.clear()
            self.staged.clear()
            self.fallbacks += 1
            return None
        self.peak_rows = max(self.peak_rows, num_rows)
        return self._stage(decodes, fills, num_rows)

    def _assign(self, decodes: list[ScheduledSequence]) -> list[tuple[int, torch.Tensor]]:
        """A row for every decode (compacting first when most rows are idle) -> the (row, blocks)
        fills that bring rows up to date before this step's token."""
        if len(self.rows) + 8 < max(self.rows.values(), default=-1) // 2:  # mostly idle rows: compact
            self.rows.clear()
            self.staged.clear()
        free = sorted(set(range(len(decodes) + len(self.rows))) - set(self.rows.values()), reverse=True)
        fills = []
        for d in decodes:
            seq = d.seq
            new_row = seq not in self.rows
            if new_row:
                self.rows[seq] = free.pop()
                self.staged[seq] = 0
            # The row must hold tokens [0, start) before this step, and zeros past them: a new row
            # holds an earlier owner's tokens even when start is 0 (a one-token first chunk).
            if new_row or self.staged[seq] != d.start:
                num_blocks = -(-d.start // self.block_size)
                fills.append((self.rows[seq], torch.tensor(seq.block_table[:num_blocks], dtype=torch.long)))
            self.staged[seq] = d.end
        return fills

    def _stage(
        self, decodes: list[ScheduledSequence], fills: list[tuple[int, torch.Tensor]], num_rows: int
    ) -> DecodeStage:
        device = self.layers[0].k.device
        lengths = torch.zeros(num_rows, dtype=torch.long)
        for seq, row in self.rows.items():
            lengths[row] = self.staged[seq]
        # All allocated columns are attended (masked past each row's length): a (rows, kv_heads, L, d)
        # slice with L short of the allocation is not dense, and matmul would copy it whole.
        valid = torch.arange(self.length)[None, :] < lengths[:, None]  # (R, L)
        valid[:, 0] = True  # idle rows attend to something (their output is discarded), never to nothing
        rows = torch.tensor([self.rows[d.seq] for d in decodes])
        positions = torch.tensor([d.start for d in decodes])  # each new token's index in its row
        kv_heads = self.layers[0].k.shape[0]
        slots = (rows[:, None] * kv_heads + torch.arange(kv_heads)) * self.length + positions[:, None]
        return DecodeStage(
            rows=rows.to(device),
            slots=slots.to(device),
            fills=[(row, blocks.to(device)) for row, blocks in fills],
            valid=valid.to(device),
            dense=rows.tolist() == list(range(num_rows)),
        )

    def _reserve(self, num_rows: int, length: int) -> bool:
        """Grow every layer's buffers (by doubling, keeping their content) to hold rows x length."""
        if num_rows <= self.num_rows and length <= self.length:
            return True
        # Never fewer rows than allocated: after a compaction a step may need few rows but more
        # columns, and the old rows' content is copied into the new buffers.
        new_rows = self.num_rows
        if num_rows > self.num_rows:
            new_rows = max(num_rows, min(2 * self.num_rows, num_rows + 64))
        if length > self.length:  # columns are all attended to: grow them by a quarter, not double
            length = max(length, self.length + max(self.length // 4, 4 * self.block_size))
        new_length = max(length, self.length)
        sample = self.layers[0].k
        kv_heads, _, _, dim = sample.shape
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        size = 2 * len(self.layers) * new_rows * kv_heads * new_length * dim * itemsize
        if size > self.max_bytes:
            for layer in self.layers:
                layer.stage_k = layer.stage_v = None
            self.num_rows = self.length = 0
            return False
        for layer in self.layers:
            for name in ("stage_k", "stage_v"):
                old = getattr(layer, name)
                # masked columns: 0, never NaN
                new = sample.new_zeros(new_rows, kv_heads, new_length, dim, dtype=self.dtype)
                if old is not None:
                    new[: old.shape[0], :, : old.shape[2]] = old
                setattr(layer, name, new)
        self.num_rows, self.length = new_rows, new_length
        return True
