"""The gateway's Prometheus metrics: responses by route and status, generation outcomes and latency."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mmserve.metric_labels import label_values, with_labels


class Metrics:
    """Every response by route and status (counted as its status is sent, whatever sent it: a route, an
    error handler, the auth or body-size check); for chat and completions requests that passed
    validation, how they ended and their end-to-end latency, recorded when the response ends (for a
    stream: its last event sent, or the client gone).

    They are recorded in `registry`; /metrics serves `exposed`, the same with every sample labelled
    `model_name` (the served model's id) and `replica` ($MMSERVE_REPLICA, else the host name)."""

    OUTCOMES = ("completed", "error", "client_disconnected")

    def __init__(self, model_name: str, replica: str = ""):
        self.registry = CollectorRegistry()
        self.exposed = with_labels(self.registry, label_values(model_name, replica))
        self.requests = Counter(
            "mmserve_gateway_requests",
            "HTTP responses by route (unknown for paths that are not routes) and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "mmserve_gateway_request_outcomes",
            "Chat/completion requests past validation by how they ended: completed, error, client_disconnected",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.e2e = Histogram(
            "mmserve_gateway_e2e_seconds",
            "End-to-end latency of chat/completion requests, until the response's end",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.ttft = Histogram("mmserve_gateway_ttft_seconds", "Time to first token", registry=self.registry)
        self.pending = Gauge(
            "mmserve_gateway_requests_pending",
            "Chat/completion requests in flight (capped by MAX_PENDING_REQUESTS; beyond it, 429)",
            registry=self.registry,
        )

    def ended(self, route: str, outcome: str, started: float) -> None:
        assert outcome in self.OUTCOMES, outcome
        self.outcomes.labels(route, outcome).inc()
        self.e2e.labels(route, outcome).observe(time.monotonic() - started)
