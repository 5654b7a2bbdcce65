"""The model runner: where a scheduled step becomes tensors (the attention backend builds its share).

It owns the paged KV cache (one key and one value tensor per layer, laid out by the attention
backend) and, for each step, builds the flat batch (decodes first, then prefill chunks): token
embeddings with image rows written over the placeholders and positions; the backend builds its own
attention metadata (cache slots, block tables, decode staging). It returns logits only for the
sequences whose step reaches their last token.
"""

from __future__ import annotations

import torch

from llm_service.attention import PagedAttention
from llm_service.engine.compiled_decode import CompiledDecoder
from llm_service.engine.scheduler import ScheduledSequence, SchedulerOutput
from llm_service.engine.sequence import Sequence
from mmserve.half_cpu import upcast_rows
from mmserve.interfaces import LanguageAdapter
from mmserve.wire import GenerateRequest, SamplingParams

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
GPU_MEMORY_FRACTION = 0.9  # of the memory free after loading the weights, when no budget is set


def kv_cache_bytes_per_block(model, block_size: int) -> int:
    config = model.decoder.config
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


def num_kv_blocks(model, block_size: int, budget: int) -> int:
    """How many blocks a KV cache budget of `budget` bytes holds (0: 2 GiB on CPU, 90% of the free
    memory on CUDA)."""
    per_block = kv_cache_bytes_per_block(model, block_size)
    if not budget:
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = int(free * GPU_MEMORY_FRACTION)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
    if budget < per_block:
        raise ValueError(f"the KV cache budget ({budget} bytes) is less than one block ({per_block} bytes)")
    return budget // per_block


class ModelRunner:
    def __init__(
        self, model: LanguageAdapter, attention: PagedAttention, num_blocks: int, compile_decode: bool = False
    ):
        self.model = model
        self.attend = attention  # builds each step's metadata, and computes attention in every layer
        config = model.decoder.config
        self.num_blocks = num_blocks
        self.kv_caches = attention.allocate(
            config.num_layers, num_blocks, config.num_kv_heads, config.head_dim, model.dtype
        )
        self.mrope = model.position_dims == 3
        self.compiled = CompiledDecoder(model.decoder) if compile_decode else None
        if self.compiled is not None:
            self.compiled.warm_up(self._synthetic_decode, self._compiled_batch_sizes())

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
        meta = self.attend.metadata(decodes, chunks)
        decoder = self.model.decoder
        if self.compiled is not None and self.compiled.handles(len(ids), meta):
            decoder = self.compiled
        hidden = decoder(embeds, self._positions(items).to(device), self.kv_caches, meta, self.attend)
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

    def _compiled_batch_sizes(self) -> list[int]:
        """Batch sizes that make every graph the compiled step needs: 1 (a graph of its own: some
        shape checks specialize a size-1 batch), 2 (for 2..N-1), and N when a half model's Linear layers
        switch to float32 at N rows on this CPU (mmserve.half_cpu)."""
        threshold = upcast_rows(self.model.dtype, self.model.device)
        return [1, 2, threshold] if threshold > 2 else [1, 2]

    def _synthetic_decode(self, size: int) -> bool:
        """Two decode steps of `size` made-up sequences of zeros, before the engine takes requests: the
        first stages their rows (eagerly), the second runs compiled. They use blocks 0..2*size-1, which
        no sequence holds yet; what they write there is stale data the next owner never reads (the
        attention backends mask past each sequence's own tokens). False: too few blocks."""
        block = self.attend.block_size
        if 2 * size > self.num_blocks:
            return False
        params = SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)
        seqs = [
            Sequence(GenerateRequest(f"warm-up-{i}", [0] * (block + 1), [], params), []) for i in range(size)
        ]
        for i, seq in enumerate(seqs):
            seq.block_table = [2 * i, 2 * i + 1]
        for step in ("stage", "compiled"):
            if step == "compiled":  # each one's next token
                for seq in seqs:
                    seq.token_ids.append(0)
            self.execute(SchedulerOutput([ScheduledSequence(seq, seq.num_tokens - 1, 1) for seq in seqs]))
        staging = getattr(self.attend, "staging", None)
        if staging is not None:
            staging.plan([])  # hands their staging rows back
        return True

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
