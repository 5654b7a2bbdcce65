"""GET /health, /ready, /metrics and /v1/models: what orchestrators, scrapers and clients ask about."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.http.context import served
from gateway.replicas import ReplicaPool
from mmserve.errors import MMServeError

router = APIRouter()


async def backend_states(backends: dict[str, ReplicaPool]) -> tuple[dict, dict]:
    """(each backend service's replicas with what each answers on grpc.health.v1 now, the services with
    no replica SERVING). A service with one replica serving is up: requests avoid the others."""
    states = {name: await pool.check_now() for name, pool in backends.items()}
    return states, {name: s for name, s in states.items() if "SERVING" not in s.values()}


@router.get("/health")
async def health(request: Request):
    """200 when both backends serve (what compose's healthcheck waits for), with every replica's state."""
    states, down = await backend_states(served(request).backends)
    if down:
        return JSONResponse({"status": "unavailable", "backends": down}, status_code=503)
    return {"status": "ok", "backends": states}


@router.get("/ready")
async def ready(request: Request):
    """Readiness (a load balancer's question): the backends serve and this gateway is not draining."""
    context = served(request)
    states, down = await backend_states(context.backends)
    draining = context.core.drain.started
    if draining or down:
        reason = "draining" if draining else "backend unavailable"
        return JSONResponse({"status": reason, "backends": down}, status_code=503)
    return {"status": "ready", "backends": states}


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
