"""EngineStats, and the Prometheus exposition llm_service/metrics.py makes of it at each scrape."""

from __future__ import annotations

from prometheus_client import generate_latest

from llm_service.engine.stats import Distribution, EngineStats
from llm_service.metrics import EngineMetrics

# Every series the LLM service exported before the stats moved into one object (dashboards use them),
# less prometheus_client's *_created timestamps of counters and histograms.
EXPORTED = {
    "mmserve_llm_running_requests",
    "mmserve_llm_waiting_requests",
    "mmserve_llm_kv_cache_blocks",
    "mmserve_llm_kv_cache_usage",
    "mmserve_llm_prefix_cache_queries_tokens",
    "mmserve_llm_prefix_cache_hits_tokens",
    "mmserve_llm_prompt_tokens_total",
    "mmserve_llm_cached_prompt_tokens_total",
    "mmserve_llm_generated_tokens_total",
    "mmserve_llm_preemptions_total",
    "mmserve_llm_requests_total",
    *(
        f"mmserve_llm_{name}_{part}"
        for name in ("step_tokens", "queue_seconds", "ttft_seconds", "inter_token_seconds", "e2e_seconds")
        for part in ("bucket", "count", "sum")
    ),
}


def test_a_value_on_a_bound_counts_in_that_bucket():
    dist = Distribution((1, 4, 16))
    for value in (0.5, 1, 4, 5, 100):
        dist.observe(value)
    assert dist.counts == [2, 1, 1, 1] and dist.total == 110.5


def test_the_exposition_reads_the_stats_at_each_scrape():
    stats = EngineStats(kv_blocks=64)
    registry = EngineMetrics(stats).registry
    assert registry.get_sample_value("mmserve_llm_kv_cache_blocks") == 64
    assert registry.get_sample_value("mmserve_llm_requests_total", {"reason": "stop"}) is None
    stats.request_finished("stop")
    stats.request_finished("stop")
    stats.ttft.observe(0.3)
    stats.generated_tokens += 5
    assert registry.get_sample_value("mmserve_llm_requests_total", {"reason": "stop"}) == 2
    assert registry.get_sample_value("mmserve_llm_generated_tokens_total") == 5
    assert registry.get_sample_value("mmserve_llm_ttft_seconds_bucket", {"le": "0.25"}) == 0
    assert registry.get_sample_value("mmserve_llm_ttft_seconds_bucket", {"le": "0.5"}) == 1
    assert registry.get_sample_value("mmserve_llm_ttft_seconds_bucket", {"le": "+Inf"}) == 1
    assert registry.get_sample_value("mmserve_llm_ttft_seconds_count") == 1
    text = generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert names == EXPORTED
