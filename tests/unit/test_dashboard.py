"""deploy/grafana's dashboard asks only for series the three services export (a renamed metric would
leave a panel silently empty) and covers the main signals."""

from __future__ import annotations

import json
import re
import time

from gateway.http.metrics import Metrics
from llm_service.engine.stats import EngineStats
from llm_service.metrics import EngineMetrics
from mmserve.metric_labels import label_values, with_labels
from tests.helpers import ROOT
from vision_service.metrics import VisionMetrics

DASHBOARD = ROOT / "deploy" / "grafana" / "mmserve-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    registries = (Metrics("m").registry, EngineMetrics(EngineStats()).registry, VisionMetrics().registry)
    return {
        metric.name + suffix
        for registry in registries
        for metric in registry.collect()
        for suffix in SUFFIXES[metric.type]
    }


def exported_labels() -> set[str]:
    """The label names on the pages the three serve, with a series of each labelled metric recorded."""
    gateway = Metrics("m")
    gateway.requests.labels("/v1/chat/completions", "200").inc()
    gateway.ended("/v1/chat/completions", "completed", time.monotonic())
    stats = EngineStats()
    stats.request_finished("stop")
    pages = (
        gateway.exposed,
        with_labels(EngineMetrics(stats).registry, label_values("m")),
        with_labels(VisionMetrics().registry, label_values("m")),
    )
    return {
        label for page in pages for metric in page.collect() for s in metric.samples for label in s.labels
    }


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> dict[str, str]:
    return {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in dashboard()["panels"]
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


def test_panels_show_the_picked_models_and_split_replicas_by_the_label_every_service_exports():
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "model_name"]
    assert variable["includeAll"] and "model_name)" in variable["query"]["query"]
    labels = exported_labels()
    for where, expr in expressions().items():
        # each series is read for the picked models only
        selectors = re.findall(r"\bmmserve_[a-z0-9_]+(\{[^}]*\})?", expr)
        assert selectors and set(selectors) == {'{model_name=~"$model_name"}'}, where
        # grouped by labels the services put on their samples (not `pod`: compose has no such label)
        grouped = {
            label.strip() for clause in re.findall(r"by \(([^)]*)\)", expr) for label in clause.split(",")
        }
        assert grouped <= labels, (where, grouped - labels)
        if "per LLM replica" in where:
            assert "by (replica)" in expr, where
