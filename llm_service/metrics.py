"""Prometheus metrics of the LLM engine (one registry per engine, served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class EngineMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("mmserve_llm_running_requests", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("mmserve_llm_waiting_requests", "Sequences waiting to be scheduled", registry=r)
        self.finished = Counter(
            "mmserve_llm_requests", "Finished requests by outcome", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("mmserve_llm_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_prompt_tokens = Counter(
            "mmserve_llm_cached_prompt_tokens",
            "Prompt tokens whose KV came from the prefix cache",
            registry=r,
        )
        self.generated_tokens = Counter("mmserve_llm_generated_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter(
            "mmserve_llm_preemptions", "Sequences preempted (recomputed later)", registry=r
        )
        self.kv_blocks = Gauge("mmserve_llm_kv_cache_blocks", "KV cache blocks in the pool", registry=r)
        self.kv_usage = Gauge(
            "mmserve_llm_kv_cache_usage", "Fraction of KV blocks held by sequences", registry=r
        )
        self.prefix_queries = Gauge(
            "mmserve_llm_prefix_cache_queries_tokens",
            "Tokens looked up in the prefix cache on admission (and re-admission after preemption)",
            registry=r,
        )
        self.prefix_hits = Gauge(
            "mmserve_llm_prefix_cache_hits_tokens", "Looked-up tokens found in the prefix cache", registry=r
        )
        self.step_tokens = Histogram(
            "mmserve_llm_step_tokens",
            "Tokens computed per engine step",
            buckets=_STEP_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "mmserve_llm_queue_seconds", "Submit to first scheduled", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "mmserve_llm_ttft_seconds", "Submit to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "mmserve_llm_inter_token_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "mmserve_llm_e2e_seconds", "Submit to finish", buckets=_LATENCY_BUCKETS, registry=r
        )
