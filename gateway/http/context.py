"""What the HTTP routes serve, handed to them through the app's state."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from gateway.http.metrics import Metrics
from gateway.replicas import ReplicaPool
from gateway.serving import ServingCore


@dataclass(frozen=True)
class Served:
    core: ServingCore
    model_name: str  # the public name: what `model` in a request must be, what /v1/models lists
    metrics: Metrics
    backends: dict[str, ReplicaPool]  # whose health /health reports (none in-process)
    request_timeout_s: float = 0.0  # a chat/completion request's total time; 0 = no bound


def served(request: Request) -> Served:
    return request.app.state.served
