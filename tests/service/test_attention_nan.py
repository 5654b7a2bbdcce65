"""NaN containment in the sdpa backend: garbage in a sequence's KV (a poisoned input), or stale KV in
slots no sequence owns (free blocks, the tail of a reused block, block 0 used as padding, idle staging
rows), never reaches another sequence of the batch. Masked positions are selected away, never
multiplied by zero (0 * NaN = NaN).

The tiny model's runner is driven step by step over the scheduler's real batches (decodes, chunked
prefills over cached context, finished sequences whose blocks are reused), once on a clean cache
and once with NaN written before every step into every slot that is not a healthy sequence's own KV:
every other sequence's logits are bit-for-bit those of the clean run.
"""

from __future__ import annotations

import pytest
import torch

from llm_service.attention import SdpaAttention
from llm_service.config import LLMConfig
from llm_service.engine.block_manager import BlockManager
from llm_service.engine.model_runner import ModelRunner
from llm_service.engine.scheduler import Scheduler
from llm_service.engine.sequence import Sequence
from llm_service.models import load_language_model
from mmserve.wire import GenerateRequest, SamplingParams

BLOCK = 4
NUM_BLOCKS = 64
VICTIM = "r1"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))


def sequence(i: int, vocab: int, image_id: int) -> Sequence:
    generator = torch.Generator().manual_seed(i)
    prompt = [t for t in torch.randint(3, vocab, (3 + 5 * i,), generator=generator).tolist() if t != image_id]
    params = SamplingParams(temperature=0.0, max_new_tokens=3 + 4 * (i % 3), ignore_eos=True)
    return Sequence(GenerateRequest(f"r{i}", prompt, [], params))


def poison(attention: SdpaAttention, layers, scheduler: Scheduler) -> None:
    """NaN into every KV slot (paged cache and staging rows) but the healthy sequences' computed tokens."""
    owned = torch.zeros(NUM_BLOCKS, BLOCK, dtype=torch.bool)
    for seq in scheduler.running:
        if seq.request_id != VICTIM:
            for pos in range(seq.num_computed_tokens):
                owned[seq.block_table[pos // BLOCK], pos % BLOCK] = True
    staging = attention.staging
    staged_rows = {row for seq, row in staging.rows.items() if seq.request_id != VICTIM} if staging else set()
    for layer in layers:
        layer.k[:, ~owned] = torch.nan  # (kv_heads, blocks, block_size, d) cache
        layer.v[:, ~owned] = torch.nan
        for buffer in (layer.stage_k, layer.stage_v):
            if buffer is not None:
                for row in set(range(buffer.shape[0])) - staged_rows:
                    buffer[row] = torch.nan


def run(model, staging_bytes: int, poisoned: bool) -> dict[str, list[torch.Tensor]]:
    """Each sequence's logits at every step it sampled (greedy), over the scheduler's own batches."""
    attention = SdpaAttention(BLOCK, torch.device("cpu"), staging_bytes)
    runner = ModelRunner(model, attention, NUM_BLOCKS)
    scheduler = Scheduler(BlockManager(NUM_BLOCKS, BLOCK, False), 6, max_num_batched_tokens=12)
    pending = [sequence(i, model.vocab_size, model.image_token_id) for i in range(9)]
    for seq in pending[:6]:
        scheduler.add(seq)
    logits_of: dict[str, list[torch.Tensor]] = {seq.request_id: [] for seq in pending}
    for step in range(60):
        if step == 8:  # later arrivals get blocks that finished sequences left behind
            for seq in pending[6:]:
                scheduler.add(seq)
        if not scheduler.has_work():
            break
        plan = scheduler.schedule()
        if poisoned:
            poison(attention, runner.kv_caches, scheduler)
        sampling, logits = runner.execute(plan)
        scheduler.update(plan)
        for item, row in zip(sampling, logits, strict=True):
            seq = item.seq
            logits_of[seq.request_id].append(row.clone())
            seq.append_token(int(torch.argmax(torch.nan_to_num(row, nan=0.0))))
            if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                scheduler.finish(seq)
    assert not scheduler.has_work()
    return logits_of


@pytest.mark.parametrize("staging_bytes", [0, 64 << 20], ids=["gathered", "staged"])
def test_nan_in_stale_slots_and_in_one_sequence_never_reaches_the_others(model, staging_bytes):
    with torch.inference_mode():
        clean = run(model, staging_bytes, poisoned=False)
        dirty = run(model, staging_bytes, poisoned=True)
    assert not torch.isfinite(torch.stack(dirty[VICTIM])).all()  # its own KV was NaN: its logits are
    for request_id, rows in clean.items():
        if request_id != VICTIM:
            assert len(dirty[request_id]) == len(rows)
            for step, (want, got) in enumerate(zip(rows, dirty[request_id], strict=True)):
                assert torch.equal(want, got), (request_id, step)
