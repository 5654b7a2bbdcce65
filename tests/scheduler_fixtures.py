"""Shared helpers for the scheduler tests.

`EngineLoop` drives the scheduler the way the engine loop does, with a fixed fake sampled token.
"""

from __future__ import annotations

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.scheduler import Scheduler, SchedulerOutput
from llm_service.engine.sequence import Sequence, image_keys
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

BLOCK = 4
TOKEN = 7  # what the fake model always samples
IMG = 99


class EngineLoop:
    """The engine loop without a model: schedule, update, sample TOKEN, finish at max_new_tokens."""

    def __init__(self, num_blocks=16, max_num_seqs=8, budget=32, prefix_caching=True):
        self.manager = BlockManager(num_blocks, BLOCK, prefix_caching)
        self.scheduler = Scheduler(self.manager, max_num_seqs, budget)
        self.finished: list[Sequence] = []
        self.num_added = 0
        self.sampled: list[Sequence] = []  # the sequences that sampled in the last step

    def add(self, token_ids: list[int], max_new: int = 4, images: list[ImageSpan] | None = None) -> Sequence:
        self.num_added += 1
        params = SamplingParams(max_new_tokens=max_new)
        request = GenerateRequest(f"r{self.num_added}", token_ids, images or [], params)
        s = Sequence(request, image_keys(request))
        self.scheduler.add(s)
        return s

    def step(self) -> SchedulerOutput:
        plan = self.scheduler.schedule()
        assert plan.num_tokens <= self.scheduler.max_num_batched_tokens
        self.scheduler.update(plan)
        # `samples` must be read before the append moves the sequence's end
        self.sampled = [item.seq for item in plan.scheduled if item.samples]
        for item in plan.scheduled:
            if item.seq in self.sampled:
                item.seq.append_token(TOKEN)
                if len(item.seq.output_token_ids) == item.seq.params.max_new_tokens:
                    self.scheduler.finish(item.seq)
                    self.finished.append(item.seq)
        return plan

    def run(self, max_steps: int = 1000) -> int:
        for steps in range(1, max_steps + 1):
            self.step()
            if not self.scheduler.has_work():
                return steps
        raise AssertionError(f"still working after {max_steps} steps")


def prompt(n: int, first: int = 1000) -> list[int]:
    return list(range(first, first + n))


def chunks(plan: SchedulerOutput) -> dict[Sequence, tuple[int, int]]:
    """Each scheduled sequence -> (start, num_tokens)."""
    return {item.seq: (item.start, item.num_tokens) for item in plan.scheduled}


def preempting_engine(prefix_caching: bool) -> tuple[EngineLoop, Sequence, Sequence]:
    """4 blocks: `old` (8 tokens) and `new` (7 tokens) fill them in step 1; in step 2 old's first
    output token needs a 5th block, so new is preempted; old finishes in step 3."""
    engine = EngineLoop(num_blocks=4, prefix_caching=prefix_caching)
    old, new = engine.add(prompt(8), max_new=3), engine.add(prompt(7, 2000), max_new=3)
    engine.step()
    assert engine.manager.num_free_blocks == 0
    return engine, old, new
