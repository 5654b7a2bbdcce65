"""The entry-point shape the two gRPC services share: load (a bad setting, checkpoint or busy port is one
line and exit code 2), start metrics, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from mmserve.cli import debug_requested, startup_errors
from mmserve.grpc_util import BindError, serve, serve_metrics
from mmserve.service_config import ServiceConfig


@dataclass
class LoadedService:
    """A service whose model is loaded: what `serve` needs to run it."""

    settings: ServiceConfig  # LLMConfig / VisionConfig
    service_name: str  # the gRPC service's full name (health, reflection)
    add_servicer: Callable[[grpc.aio.Server], None]
    metrics_registry: Any  # prometheus_client.CollectorRegistry
    on_stop: Callable[[], None]  # after the drain, or when the bind fails after loading
    liveness: Callable[[], bool] | None = None  # NOT_SERVING once this turns false


def run_grpc_service(prog: str, load: Callable[[list[str]], LoadedService], argv=None) -> None:
    """`prog`'s main: `load(argv)` checks the settings and port before it loads any weights, where it can
    (MMSERVE_DEBUG=1 / --debug shows tracebacks); then serve until SIGINT/SIGTERM."""
    short = prog.removesuffix("_service")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {short} %(levelname)s %(message)s")
    argv, debug = debug_requested(argv)
    with startup_errors(prog, debug):
        service = load(argv)
    settings = service.settings
    if settings.metrics_port:
        serve_metrics(
            settings.metrics_port, settings.host, service.metrics_registry, settings.metric_labels()
        )
    try:
        died = asyncio.run(
            serve(
                service.add_servicer,
                service.service_name,
                settings.host,
                settings.port,
                settings.max_message_bytes,
                grace_seconds=settings.drain_timeout_s,
                on_stop=service.on_stop,
                liveness=service.liveness,
                internal_token=settings.internal_token,
            )
        )
    except BindError:  # the port was taken while the model loaded
        service.on_stop()
        with startup_errors(prog, debug):
            raise
    if died:  # non-zero, so that compose's restart policy, Kubernetes or the launcher replaces the process
        sys.exit(f"{prog}: the model failed and the service can no longer serve; exiting to be restarted")
