"""The OpenAI-compatible HTTP app: routes, error handlers and middleware over one ServingCore."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.routing import Route

from gateway.http import routes_admin, routes_chat, routes_completions, routes_playground
from gateway.http.context import Served
from gateway.http.errors import install_error_handlers
from gateway.http.metrics import Metrics
from gateway.http.middleware import Auth, BodyLimit, CountResponses, PendingLimit
from gateway.replicas import PoolMetrics, ReplicaPool
from gateway.serving import ServingCore

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PENDING_REQUESTS = 512
DEFAULT_REQUEST_TIMEOUT_S = 600.0
GENERATION_PATHS = frozenset({routes_chat.ROUTE, routes_completions.ROUTE})


def create_app(
    core: ServingCore,
    model_name: str,
    api_key: str | None = None,
    backends: dict[str, ReplicaPool] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> FastAPI:
    """`backends` maps a service name to its replicas, whose health /health reports (None in-process);
    `request_timeout_s` bounds a chat/completion request's total time (0 = no bound)."""
    app = FastAPI(title="mmserve gateway")
    metrics = app.state.metrics = Metrics(model_name)
    app.state.served = Served(core, model_name, metrics, dict(backends or {}), request_timeout_s)
    if backends:
        metrics.registry.register(PoolMetrics(backends.values()))
    install_error_handlers(app)
    routers = [module.router for module in (routes_admin, routes_chat, routes_completions, routes_playground)]
    for router in routers:
        app.include_router(router)
    # Outermost last: count every response, then the API key, then the cap on requests in flight, then
    # the body size, then FastAPI.
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    app.add_middleware(PendingLimit, limit=max_pending_requests, paths=GENERATION_PATHS, metrics=metrics)
    app.add_middleware(Auth, expected=f"Bearer {api_key}".encode() if api_key else None)
    app.add_middleware(CountResponses, metrics=metrics, paths=route_paths(app.router, *routers))
    return app


def route_paths(*routers: APIRouter) -> frozenset[str]:
    """The paths of the routes themselves (FastAPI's docs pages included), not of included routers."""
    return frozenset(route.path for router in routers for route in router.routes if isinstance(route, Route))
