"""Prometheus metrics of the LLM engine: its EngineStats, read at each scrape (served on --metrics-port)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_service.engine.stats import Distribution, EngineStats

PREFIX = "mmserve_llm_"
# name (without PREFIX), help, and what it reads of EngineStats
Read = Callable[[EngineStats], float]
GAUGES: tuple[tuple[str, str, Read], ...] = (
    ("running_requests", "Sequences in the running batch", lambda s: s.running),
    ("waiting_requests", "Sequences waiting to be scheduled", lambda s: s.waiting),
    ("kv_cache_blocks", "KV cache blocks in the pool", lambda s: s.kv_blocks),
    ("kv_cache_usage", "Fraction of KV blocks held by sequences", lambda s: s.kv_usage),
    (
        "prefix_cache_queries_tokens",
        "Tokens looked up in the prefix cache on admission (and re-admission after preemption)",
        lambda s: s.prefix_queries,
    ),
    ("prefix_cache_hits_tokens", "Looked-up tokens found in the prefix cache", lambda s: s.prefix_hits),
)
COUNTERS: tuple[tuple[str, str, Read], ...] = (  # exported with the suffix _total
    ("prompt_tokens", "Prompt tokens admitted", lambda s: s.prompt_tokens),
    (
        "cached_prompt_tokens",
        "Prompt tokens whose KV came from the prefix cache",
        lambda s: s.cached_prompt_tokens,
    ),
    ("generated_tokens", "Tokens generated", lambda s: s.generated_tokens),
    ("preemptions", "Sequences preempted (recomputed later)", lambda s: s.preemptions),
)
HISTOGRAMS: tuple[tuple[str, str, Callable[[EngineStats], Distribution]], ...] = (
    ("step_tokens", "Tokens computed per engine step", lambda s: s.step_tokens),
    ("queue_seconds", "Submit to first scheduled", lambda s: s.queue_time),
    ("ttft_seconds", "Submit to first token", lambda s: s.ttft),
    ("inter_token_seconds", "Time between tokens", lambda s: s.itl),
    ("e2e_seconds", "Submit to finish", lambda s: s.e2e),
)


class EngineMetrics(Collector):
    """A registry holding one collector that turns the engine's stats into metric families."""

    def __init__(self, stats: EngineStats):
        self.stats = stats
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for name, help_text, read in GAUGES:
            yield GaugeMetricFamily(PREFIX + name, help_text, value=read(stats))
        for name, help_text, read in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_text, value=read(stats))
        finished = CounterMetricFamily(PREFIX + "requests", "Finished requests by outcome", labels=["reason"])
        for reason, count in dict(stats.finished).items():  # a copy: the worker may add an outcome
            finished.add_metric([reason], count)
        yield finished
        for name, help_text, distribution in HISTOGRAMS:
            yield _histogram(PREFIX + name, help_text, distribution(stats))


def _histogram(name: str, help_text: str, dist: Distribution) -> HistogramMetricFamily:
    counts = list(dist.counts)  # a copy, so that the buckets and their count agree
    cumulative, buckets = 0, []
    for bound, count in zip([*dist.bounds, float("inf")], counts, strict=True):
        cumulative += count
        buckets.append((_le(bound), cumulative))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=dist.total)


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it ("+Inf", "1.0", "0.005")."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
