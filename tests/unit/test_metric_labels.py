"""Every sample the three processes serve on /metrics carries `model_name` and `replica` (read from the
real exposition: the gateway's route, and the services' metrics server), and both have the documented
defaults."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.metrics import Metrics
from llm_service.config import LLMConfig
from llm_service.engine.stats import EngineStats
from llm_service.metrics import EngineMetrics
from mmserve.grpc_util import serve_metrics
from mmserve.metric_labels import REPLICA_ENV, label_values
from mmserve.service_config import ServiceConfig
from tests.gateway_app import CHAT, chat, make_app, send
from tests.helpers import free_ports
from tests.unit.test_api import MODEL
from vision_service.config import VisionConfig
from vision_service.metrics import VisionMetrics

LABELS = {"model_name": 'org/Model "v2"', "replica": "llm-7f9c-x2k"}  # quotes: the exposition escapes them


def samples(exposition: str) -> list:
    return [sample for family in text_string_to_metric_families(exposition) for sample in family.samples]


def assert_every_sample_labeled(exposition: str, labels: dict[str, str], needed: set[str]) -> None:
    """Every sample has `labels`, and the page has the samples named in `needed` (so that a page with
    fewer series than expected cannot pass)."""
    found = samples(exposition)
    assert needed <= {sample.name for sample in found}, needed - {sample.name for sample in found}
    for sample in found:
        assert sample.labels.items() >= labels.items(), sample


def served(registry, labels: dict[str, str]) -> str:
    """The address of the page the services' metrics server (serve_metrics) serves for `registry`."""
    (port,) = free_ports(1)
    serve_metrics(port, "127.0.0.1", registry, labels)  # a daemon thread, gone with the test process
    return f"http://127.0.0.1:{port}/metrics"


def scrape_served(registry, labels: dict[str, str]) -> str:
    return httpx.get(served(registry, labels), timeout=5).text


def test_every_llm_sample_carries_the_labels_histograms_and_counters_included():
    stats = EngineStats(kv_blocks=64, running=2)
    stats.ttft.observe(0.2)
    stats.generated_tokens = 5
    stats.request_finished("stop")
    page = scrape_served(EngineMetrics(stats).registry, LABELS)
    needed = {
        "mmserve_llm_running_requests",
        "mmserve_llm_requests_total",
        "mmserve_llm_generated_tokens_total",
    }
    needed |= {f"mmserve_llm_ttft_seconds_{part}" for part in ("bucket", "sum", "count")}
    assert_every_sample_labeled(page, LABELS, needed)
    (finished,) = [s for s in samples(page) if s.name == "mmserve_llm_requests_total"]
    assert finished.labels == {"reason": "stop", **LABELS} and finished.value == 1  # its own label kept


def test_every_vision_sample_carries_the_labels():
    metrics = VisionMetrics()
    metrics.encode.observe(0.01)
    metrics.cache_hits.inc()
    page = scrape_served(metrics.registry, LABELS)
    needed = {"mmserve_vision_images_total", "mmserve_vision_cache_hits_total", "mmserve_vision_cache_bytes"}
    needed |= {f"mmserve_vision_encode_seconds_{part}" for part in ("bucket", "sum", "count")}
    assert_every_sample_labeled(page, LABELS, needed)


def test_every_gateway_sample_carries_the_served_model_and_the_replica(llm, monkeypatch):
    monkeypatch.setenv(REPLICA_ENV, "gateway-0")
    llm.answer = "ok"
    with TestClient(make_app(llm)) as http:
        assert send(http, CHAT, chat()).status_code == 200
        page = http.get("/metrics").text
    needed = {"mmserve_gateway_requests_total", "mmserve_gateway_requests_pending"}
    needed |= {
        f"mmserve_gateway_{name}_seconds_{part}" for name in ("ttft", "e2e") for part in ("sum", "count")
    }
    assert_every_sample_labeled(page, {"model_name": MODEL, "replica": "gateway-0"}, needed)


def test_the_recording_registry_stays_unlabeled():
    """Code and tests read values from `registry` by their own labels; only the served page has more."""
    metrics = Metrics("m", replica="r")
    metrics.requests.labels("/x", "200").inc()
    assert metrics.registry.get_sample_value(
        "mmserve_gateway_requests_total", {"route": "/x", "status": "200"}
    )
    labeled = {"route": "/x", "status": "200", "model_name": "m", "replica": "r"}
    assert metrics.exposed.get_sample_value("mmserve_gateway_requests_total", labeled) == 1


def test_replica_is_the_variable_else_the_host_name(monkeypatch):
    monkeypatch.setenv(REPLICA_ENV, "pod-a")
    assert label_values("m") == {"model_name": "m", "replica": "pod-a"}
    assert label_values("m", "given")["replica"] == "given"
    monkeypatch.delenv(REPLICA_ENV)
    assert label_values("m")["replica"] == socket.gethostname()


def test_a_service_defaults_to_the_checkpoint_folders_name_like_the_gateway(tmp_path, monkeypatch):
    monkeypatch.delenv(REPLICA_ENV, raising=False)
    checkpoint = tmp_path / "llava-1.5-7b"
    checkpoint.mkdir()
    config = ServiceConfig(checkpoint=str(checkpoint))
    assert config.metric_labels() == {"model_name": "llava-1.5-7b", "replica": socket.gethostname()}
    named = ServiceConfig(checkpoint=str(checkpoint), model_name="llava", replica="r1")
    assert named.metric_labels() == {"model_name": "llava", "replica": "r1"}


@pytest.mark.parametrize("config_cls", [LLMConfig, VisionConfig])
def test_services_read_the_labels_from_their_flags_and_environment(config_cls, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "served-name")
    monkeypatch.setenv(REPLICA_ENV, "from-env")
    parsed = config_cls.from_args(["--checkpoint", str(tmp_path), "--replica", "from-flag"])
    assert parsed.metric_labels() == {"model_name": "served-name", "replica": "from-flag"}


def test_the_served_page_reads_the_registry_at_each_scrape():
    stats = EngineStats()
    url = served(EngineMetrics(stats).registry, LABELS)
    assert "mmserve_llm_requests_total" not in {s.name for s in samples(httpx.get(url).text)}
    stats.request_finished("length")
    (finished,) = [s for s in samples(httpx.get(url).text) if s.name == "mmserve_llm_requests_total"]
    assert finished.labels == {"reason": "length", **LABELS}
