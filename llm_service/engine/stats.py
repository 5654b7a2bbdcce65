"""The engine's statistics: one object the worker thread updates and the metrics exporter reads."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.scheduler import Scheduler, SchedulerOutput
from llm_service.engine.sequence import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds
STEP_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class Distribution:
    """Observations counted into buckets (upper bounds, inclusive; the last bucket is +inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; len(bounds) + 1
    total: float = 0.0  # sum of the observed values

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass
class EngineStats:
    """Written by the engine's worker thread only; read (without a lock: each read is of one value,
    and a scrape may see one step's updates half done) by llm_service/metrics.py."""

    kv_blocks: int = 0  # in the pool
    # the state after the last step or finish
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of the pool's blocks held by sequences
    prefix_queries: int = 0  # tokens looked up in the prefix cache (admission and re-admission)
    prefix_hits: int = 0  # of those, found
    # totals since start
    finished: Counter[str] = field(default_factory=Counter)  # requests by outcome (finish reason, error)
    prompt_tokens: int = 0  # admitted
    cached_prompt_tokens: int = 0  # admitted with their KV from the prefix cache
    generated_tokens: int = 0
    preemptions: int = 0
    step_tokens: Distribution = field(default_factory=lambda: Distribution(STEP_TOKEN_BUCKETS))
    queue_time: Distribution = field(default_factory=lambda: Distribution(LATENCY_BUCKETS))  # to scheduled
    ttft: Distribution = field(default_factory=lambda: Distribution(LATENCY_BUCKETS))  # to first token
    itl: Distribution = field(default_factory=lambda: Distribution(LATENCY_BUCKETS))  # between tokens
    e2e: Distribution = field(default_factory=lambda: Distribution(LATENCY_BUCKETS))  # to finish

    def step_scheduled(self, plan: SchedulerOutput) -> None:
        self.preemptions += len(plan.preempted)
        self.step_tokens.observe(plan.num_tokens)

    def first_scheduled(self, seq: Sequence, now: float) -> None:
        """`seq` leaves the admission queue."""
        self.queue_time.observe(now - seq.arrival)
        self.prompt_tokens += seq.num_prompt_tokens
        self.cached_prompt_tokens += seq.num_cached_tokens

    def token(self, seq: Sequence, now: float) -> None:
        """`seq` got its newest token at `now` (seq.last_token_at: when it got the one before)."""
        self.generated_tokens += 1
        if len(seq.output_token_ids) == 1:
            self.ttft.observe(now - seq.arrival)
        else:
            self.itl.observe(now - (seq.last_token_at or now))

    def request_finished(self, outcome: str) -> None:
        self.finished[outcome] += 1

    def state(self, scheduler: Scheduler, manager: BlockManager) -> None:
        self.running = len(scheduler.running)
        self.waiting = len(scheduler.waiting)
        self.kv_usage = manager.usage()
        self.prefix_queries = manager.prefix_queries
        self.prefix_hits = manager.prefix_hits
