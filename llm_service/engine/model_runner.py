"""The model runner: the only place a scheduled step becomes tensors.

It owns the paged KV cache (one key and one value tensor per layer) and, for each step, builds the
flat batch (decodes first, then prefill chunks): token embeddings with image rows written over the
placeholders, positions, cache slots and attention metadata. It returns logits only for the
sequences whose step reaches their last token.
"""

from __future__ import annotations

import torch

from llm_service.attention import AttentionMetadata, LayerCache, PrefillChunk, make_backend
from llm_service.engine.decode_staging import DecodeStaging
from llm_service.engine.scheduler import ScheduledSequence, SchedulerOutput


def kv_cache_bytes_per_block(model, block_size: int) -> int:
    config = model.decoder.config
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, backend: str, staging_bytes: int = 0):
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.attend = make_backend(backend)
        config = model.decoder.config
        shape = self.attend.cache_shape(num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            LayerCache(
                torch.zeros(shape, dtype=model.dtype, device=model.device),
                torch.zeros(shape, dtype=model.dtype, device=model.device),
            )
            for _ in range(config.num_layers)
        ]
        staged = backend == "sdpa" and staging_bytes > 0
        self.staging = DecodeStaging(self.kv_caches, block_size, staging_bytes) if staged else None
        self.mrope = getattr(model, "position_dims", 1) == 3

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> tuple[list[ScheduledSequence], torch.Tensor]:
        """Run one step -> (the items that sample, their (N, vocab) float32 logits, in that order)."""
        decodes = [s for s in plan.scheduled if s.num_tokens == 1]
        chunks = [s for s in plan.scheduled if s.num_tokens > 1]
        items = decodes + chunks
        device = self.model.device
        ids: list[int] = []
        for item in items:
            ids.extend(item.seq.token_ids[item.start : item.end])
        embeds = self.model.embed_tokens(torch.tensor(ids))  # (T, hidden)
        self._write_images(items, embeds)
        hidden = self.model.decoder(
            embeds,
            self._positions(items).to(device),
            self.kv_caches,
            self._metadata(decodes, chunks),
            self.attend,
        )
        rows, sampling = [], []
        row = 0
        for item in items:
            row += item.num_tokens
            if item.samples:
                rows.append(row - 1)
                sampling.append(item)
        if not rows:
            return [], hidden.new_empty((0, 0), dtype=torch.float32)
        return sampling, self.model.decoder.logits(hidden[torch.tensor(rows, device=device)])

    def _write_images(self, items: list[ScheduledSequence], embeds: torch.Tensor) -> None:
        """Overwrite placeholder rows with the image embeddings that fall inside each chunk."""
        row = 0
        for item in items:
            for span in item.seq.request.images:
                lo, hi = max(span.offset, item.start), min(span.offset + span.length, item.end)
                if lo < hi:
                    rows = span.embedding[lo - span.offset : hi - span.offset]
                    embeds[row + lo - item.start : row + hi - item.start] = rows.to(
                        embeds.device, embeds.dtype
                    )
            row += item.num_tokens

    def _positions(self, items: list[ScheduledSequence]) -> torch.Tensor:
        if self.mrope:
            return torch.cat([self.model.positions(i.seq, i.start, i.end) for i in items], dim=1)  # (3, T)
        positions: list[int] = []
        for item in items:
            positions.extend(range(item.start, item.end))
        return torch.tensor(positions)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        size = self.block_size
        return [block_table[i // size] * size + i % size for i in range(start, end)]

    def _metadata(
        self, decodes: list[ScheduledSequence], chunks: list[ScheduledSequence]
    ) -> AttentionMetadata:
        device = self.model.device
        slot_mapping: list[int] = []
        for item in decodes + chunks:
            slot_mapping.extend(self._slots(item.seq.block_table, item.start, item.end))
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, device=device))
        meta.num_decodes = len(decodes)
        if self.backend == "flash_attn":
            self._flash_metadata(decodes, chunks, meta)
        else:
            meta.stage = self.staging.plan(decodes) if self.staging else None
            if decodes and meta.stage is None:
                self._decode_metadata(decodes, meta)
        row = len(decodes)
        for item in chunks:
            chunk = PrefillChunk(row, item.num_tokens)
            if item.start > 0 and self.backend == "sdpa":  # it attends to cached tokens too
                num_blocks = -(-item.end // self.block_size)
                chunk.ctx_blocks = torch.tensor(item.seq.block_table[:num_blocks], device=device)
                q = torch.arange(item.start, item.end, device=device)[:, None]
                chunk.mask = torch.arange(num_blocks * self.block_size, device=device)[None, :] <= q
            meta.prefills.append(chunk)
            row += item.num_tokens
        return meta

    def _decode_metadata(self, decodes: list[ScheduledSequence], meta: AttentionMetadata) -> None:
        """Each decode's blocks, padded to the longest with block 0, and which rows are real."""
        size = self.block_size
        lengths = [d.end for d in decodes]
        width = -(-max(lengths) // size)
        blocks: list[int] = []
        for d in decodes:
            table = d.seq.block_table[:width]
            blocks.extend(table)
            blocks.extend([0] * (width - len(table)))
        meta.decode_blocks = torch.tensor(blocks, device=self.model.device)
        if any(length != width * size for length in lengths):
            valid = torch.arange(width * size)[None, :] < torch.tensor(lengths)[:, None]  # (D, width * size)
            meta.decode_valid = valid.to(self.model.device)

    def _flash_metadata(
        self, decodes: list[ScheduledSequence], chunks: list[ScheduledSequence], meta: AttentionMetadata
    ) -> None:
        device = self.model.device
        items = decodes + chunks
        width = max(len(i.seq.block_table) for i in items)
        meta.block_tables = torch.tensor(
            [i.seq.block_table + [0] * (width - len(i.seq.block_table)) for i in items],
            dtype=torch.int32,
            device=device,
        )
        meta.context_lens = torch.tensor([i.end for i in items], dtype=torch.int32, device=device)
        if chunks:
            q_lens = torch.tensor([0] + [i.num_tokens for i in chunks])
            k_lens = torch.tensor([0] + [i.end for i in chunks])
            meta.cu_seqlens_q = q_lens.cumsum(0).to(device, torch.int32)
            meta.cu_seqlens_k = k_lens.cumsum(0).to(device, torch.int32)
            meta.max_seqlen_q = int(q_lens.max())
            meta.max_seqlen_k = int(k_lens.max())
