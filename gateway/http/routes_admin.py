"""GET /health, /ready, /metrics and /v1/models: what orchestrators, scrapers and clients ask about."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.http.context import served
from mmserve.errors import MMServeError

router = APIRouter()
_SERVING = health_pb2.HealthCheckResponse.SERVING


async def backends_down(backends: dict[str, grpc.aio.Channel]) -> dict[str, str]:
    """Each backend not reporting SERVING on grpc.health.v1, with what it reported instead."""
    down = {}
    for name, channel in backends.items():
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status != _SERVING:
                down[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            down[name] = exc.code().name
    return down


@router.get("/health")
async def health(request: Request):
    """200 when both backends serve (what compose's healthcheck waits for)."""
    down = await backends_down(served(request).backends)
    if down:
        return JSONResponse({"status": "unavailable", "backends": down}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """Readiness (a load balancer's question): the backends serve and this gateway is not draining."""
    context = served(request)
    down = await backends_down(context.backends)
    draining = context.core.drain.started
    if draining or down:
        reason = "draining" if draining else "backend unavailable"
        return JSONResponse({"status": reason, "backends": down}, status_code=503)
    return {"status": "ready"}


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    registry = served(request).metrics.exposed
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    context = served(request)
    card = {"id": context.model_name, "object": "model", "created": 0, "owned_by": "mmserve"}
    try:  # vLLM's extra fields, when the LLM service answers
        info = await context.core.llm_info()
        card.update(max_model_len=info.max_model_len, dtype=info.dtype)
    except MMServeError:
        pass
    return {"object": "list", "data": [card]}
