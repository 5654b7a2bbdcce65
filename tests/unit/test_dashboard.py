"""deploy/grafana's dashboard asks only for series the three services export (a renamed metric would
leave a panel silently empty) and covers the main signals."""

from __future__ import annotations

import json
import re

from gateway.http.metrics import Metrics
from llm_service.engine.stats import EngineStats
from llm_service.metrics import EngineMetrics
from tests.helpers import ROOT
from vision_service.metrics import VisionMetrics

DASHBOARD = ROOT / "deploy" / "grafana" / "mmserve-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    registries = (Metrics().registry, EngineMetrics(EngineStats()).registry, VisionMetrics().registry)
    return {
        metric.name + suffix
        for registry in registries
        for metric in registry.collect()
        for suffix in SUFFIXES[metric.type]
    }


def expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
    }


def test_every_panel_queries_series_the_services_export():
    exported = exported_series()
    for where, expr in expressions().items():
        used = set(re.findall(r"\bmmserve_[a-z0-9_]+", expr))
        assert used, where
        assert used <= exported, (where, sorted(used - exported))


def test_dashboard_covers_latency_throughput_queue_caches_and_errors():
    queried = " ".join(expressions().values())
    for series in (
        "mmserve_gateway_ttft_seconds_bucket",
        "mmserve_llm_inter_token_seconds_bucket",
        "mmserve_llm_generated_tokens_total",
        "mmserve_llm_waiting_requests",
        "mmserve_llm_kv_cache_usage",
        "mmserve_llm_cached_prompt_tokens_total",
        "mmserve_vision_cache_hits_total",
        "mmserve_gateway_requests_total",
    ):
        assert series in queried, series
