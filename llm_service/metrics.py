"""Prometheus metrics of the LLM engine (one registry per engine, served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("mmserve_llm_running_requests", "Sequences being generated", registry=r)
        self.waiting = Gauge("mmserve_llm_waiting_requests", "Requests queued for the engine", registry=r)
        self.finished = Counter("mmserve_llm_requests", "Finished requests by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("mmserve_llm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("mmserve_llm_generated_tokens", "Tokens generated", registry=r)
        self.queue_time = Histogram(
            "mmserve_llm_queue_seconds", "Submit to first step", buckets=_LATENCY_BUCKETS, registry=r
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
