"""gRPC plumbing shared by the vision and LLM services: limits, health, reflection, error mapping."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmserve.cli import StartupError
from mmserve.errors import MMServeError
from mmserve.internal_auth import RequireToken, log_state

log = logging.getLogger(__name__)

# A LLaVA-1.5-7B image embedding is 576 x 4096 bf16 = 4.7 MB, over gRPC's 4 MB default; a request
# may carry several. Both ends use this limit unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


# Connections are recycled every few minutes (in-flight calls may finish for a day), so a client that
# reaches replicas through one DNS name with gRPC's own balancing re-resolves it and spreads over
# replicas added since it connected. (The gateway resolves names itself, one channel per replica:
# gateway.replicas.)
# SO_REUSEPORT is off: gRPC turns it on by default on Linux, which lets a second server (a second stack
# started on the same ports) bind a port in use and silently take a share of its connections.
SERVER_OPTIONS = [
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 24 * 60 * 60 * 1000),
    ("grpc.so_reuseport", 0),
]


class BindError(StartupError, OSError):
    """The server's port cannot be listened on (in use, or a bad address)."""


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str):
    if isinstance(exc, MMServeError) and type(exc) is not MMServeError:
        await context.abort(grpc.StatusCode[exc.grpc_code], str(exc) or type(exc).__name__)
    log.exception("%s failed", method)  # a bug, not bad input: details stay in the log
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in {method} ({type(exc).__name__}); see the service log"
    )


def map_errors(method):
    """Map domain errors raised by a servicer method to gRPC status codes (the one place per service)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never swallowed
                await _abort(context, exc, method.__qualname__)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method.__qualname__)

    return unary_wrapper


async def start_server(
    add_servicer,
    service_full_name: str,
    host: str,
    port: int,
    max_message_bytes: int,
    internal_token: str | None = None,
):
    """Start a grpc.aio server with the service, health checking (SERVING) and reflection; with
    `internal_token`, calls other than health and reflection must carry it (mmserve.internal_auth).

    Returns (server, health servicer, bound port).
    """
    interceptors = [RequireToken(internal_token)] if internal_token else []
    server = grpc.aio.server(
        options=channel_options(max_message_bytes) + SERVER_OPTIONS, interceptors=interceptors
    )
    add_servicer(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            service_full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc >= 1.6x raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise BindError(f"cannot listen on {host}:{port} (in use by another process, or not a local address)")
    await server.start()
    for name in ("", service_full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, bound


async def serve(
    add_servicer,
    service_full_name: str,
    host: str,
    port: int,
    max_message_bytes: int,
    grace_seconds: float = 5.0,
    on_stop=None,
    liveness=None,
    internal_token: str | None = None,
) -> bool:
    """Run the server until SIGINT/SIGTERM, or until `liveness()` turns false.

    On a signal the health status turns NOT_SERVING, in-flight calls get `grace_seconds` to finish,
    then `on_stop()` (if given) runs. Returns True when the service stopped because it was no longer
    live (its caller exits non-zero, so that a restart policy or supervisor replaces the process).
    """
    server, health_servicer, bound = await start_server(
        add_servicer, service_full_name, host, port, max_message_bytes, internal_token
    )
    log_state(internal_token, "calls other than health and reflection need it")
    log.info("%s serving on %s:%d", service_full_name, host, bound)
    print(f"{service_full_name} ready on {host}:{bound}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    died = asyncio.Event()
    if liveness is not None:
        watch = loop.create_task(_watch(liveness, health_servicer, service_full_name))
        watch.add_done_callback(lambda _: _set(died, stop))
    await stop.wait()
    log.info("shutting down (grace %.1fs)", grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_seconds)
    if on_stop is not None:
        on_stop()
    return died.is_set()


def _set(*events: asyncio.Event) -> None:
    for event in events:
        event.set()


# How long a service that is no longer live keeps answering NOT_SERVING before it exits: long enough for
# the gateway's /health and probes to see why, short enough that a restart policy replaces it soon.
DEAD_EXIT_DELAY_S = 5.0


async def _watch(liveness, health_servicer, service_full_name: str) -> None:
    """Report NOT_SERVING once `liveness()` turns false (e.g. the engine failed), then return after
    DEAD_EXIT_DELAY_S so that the service exits."""
    while liveness():
        await asyncio.sleep(1.0)
    log.error(
        "%s is no longer live; reporting NOT_SERVING, exiting in %.0fs", service_full_name, DEAD_EXIT_DELAY_S
    )
    for name in ("", service_full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await asyncio.sleep(DEAD_EXIT_DELAY_S)


def serve_metrics(port: int, host: str, registry, labels: dict[str, str]) -> None:
    """Prometheus /metrics on its own port, every sample carrying `labels` (model_name, replica); a busy
    port is logged, not fatal to the service."""
    from prometheus_client import start_http_server

    from mmserve.metric_labels import with_labels

    try:
        start_http_server(port, addr=host, registry=with_labels(registry, labels))
    except OSError as exc:
        log.warning(
            "metrics endpoint not started on %s:%d (%s); the service runs without it", host, port, exc
        )
