"""The OpenAI-compatible HTTP surface: thin routes over ServingCore, one error handler."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.generation_defaults import GenerationDefaults
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.serving import GenerationSettings, ServingCore, TextDelta, TokenLogprob, new_request_id
from mmserve.errors import MMServeError, NotFoundError
from mmserve.wire import PixelLimits, SamplingParams, Usage

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


def error_body(
    message: str, kind: str, status: int, param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error shape; `code` is a string or null, as the official API sends it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_json(exc: MMServeError) -> dict:
    return error_body(str(exc), exc.error_type, exc.http_status, code=getattr(exc, "code", None))


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmserve_gateway_requests",
            "Requests by route and outcome",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.e2e = Histogram(
            "mmserve_gateway_e2e_seconds", "End-to-end request latency", ["route"], registry=self.registry
        )
        self.ttft = Histogram("mmserve_gateway_ttft_seconds", "Time to first token", registry=self.registry)


def sampling_params(body: SamplingFields, defaults: GenerationDefaults) -> SamplingParams:
    """The request's sampling fields; those it leaves unset come from the checkpoint's defaults."""

    def pick(value, default):
        return default if value is None else value

    return SamplingParams(
        temperature=pick(body.temperature, defaults.temperature),
        top_p=pick(body.top_p, defaults.top_p),
        top_k=0 if body.top_k == -1 else pick(body.top_k, defaults.top_k),
        min_new_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
        seed=None if body.seed is None else body.seed % (1 << 64),  # the wire carries uint64
        repetition_penalty=pick(body.repetition_penalty, defaults.repetition_penalty),
        min_p=pick(body.min_p, defaults.min_p),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logprobs=body.num_logprobs,
    )


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def _until_disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the request body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, work):
    """Run `work` (a coroutine), cancelling it if the client disconnects first: an abandoned
    request must not keep the engine busy."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    return task.result()


class _BodyLimit:
    """ASGI middleware: requests whose body exceeds `limit` bytes get 413 before they are parsed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooLarge:
            return await self._reject(send)

    async def _reject(self, send):
        body = json.dumps(
            error_body(f"request body is over the {self.limit} byte limit", "invalid_request_error", 413)
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(
    core: ServingCore,
    model_name: str,
    api_key: str | None = None,
    backends: dict | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """`backends` maps a name to a gRPC channel whose health /health reports (None in-process)."""
    app = FastAPI(title="mmserve gateway")
    app.add_middleware(_BodyLimit, limit=max_request_bytes)
    metrics = Metrics()
    expected_auth = f"Bearer {api_key}".encode() if api_key else None

    @app.exception_handler(MMServeError)
    async def _domain_error(request: Request, exc: MMServeError):
        if exc.http_status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.http_status, exc)
        return JSONResponse(error_json(exc), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid request")
        )
        return JSONResponse(error_body(message, "invalid_request_error", 400, where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", exc.status_code), status_code=exc.status_code
        )

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if expected_auth and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected_auth):
                return JSONResponse(
                    error_body("invalid or missing API key", "authentication_error", 401), status_code=401
                )
        return await call_next(request)

    async def backends_down() -> dict[str, str]:
        """Each backend not reporting SERVING on grpc.health.v1, with what it reported instead."""
        down = {}
        for name, channel in (backends or {}).items():
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    down[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                down[name] = exc.code().name
        return down

    @app.get("/health")
    async def health():
        """200 when both backends serve (what compose's healthcheck waits for)."""
        down = await backends_down()
        if down:
            return JSONResponse({"status": "unavailable", "backends": down}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness (a load balancer's question): the backends serve and this gateway is not draining."""
        down = await backends_down()
        if core.drain.started or down:
            reason = "draining" if core.drain.started else "backend unavailable"
            return JSONResponse({"status": reason, "backends": down}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "mmserve"}
        try:  # vLLM's extra fields, when the LLM service answers
            info = await core.llm_info()
            card.update(max_model_len=info.max_model_len, dtype=info.dtype)
        except MMServeError:
            pass
        return {"object": "list", "data": [card]}

    def check_model(body: SamplingFields) -> None:
        if body.model and body.model != model_name:
            error = NotFoundError(
                f"the model `{body.model}` does not exist; this server serves `{model_name}`"
            )
            error.code = "model_not_found"  # type: ignore[attr-defined]
            raise error

    async def complete(route: str, body, deltas, prepared, render, started: float) -> Response:
        parts: list[str] = []
        ids: list[int] = []
        logprobs: list[TokenLogprob] | None = None if body.num_logprobs is None else []
        last: TextDelta | None = None
        async for delta in deltas:
            if not ids:
                metrics.ttft.observe(time.monotonic() - started)
            parts.append(delta.text)
            ids.extend(delta.token_ids)
            if logprobs is not None:
                logprobs.extend(delta.logprobs or [])
            last = delta
        assert last is not None, "a generation always ends with a finishing delta"
        full = render.full("".join(parts), ids, last, prepared.token_ids, body.return_token_ids, logprobs)
        return JSONResponse(full)

    async def run(request: Request, route: str, body, text: str, urls: list[str], request_id: str, render):
        started = time.monotonic()
        settings = GenerationSettings(sampling_params(body, core.defaults), body.token_limit, body.stop_list)
        if body.mm_processor_kwargs is not None:
            kwargs = body.mm_processor_kwargs
            settings.pixels = PixelLimits(kwargs.min_pixels, kwargs.max_pixels)
        try:
            prepared = await _cancel_on_disconnect(
                request, core.prepare(text, urls, request_id, settings.pixels)
            )
            deltas = core.generate(prepared, settings, request_id)
            if body.stream:
                # errors before the first token still get a status code
                first = await _cancel_on_disconnect(request, anext(deltas))
                metrics.ttft.observe(time.monotonic() - started)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                response: Response = StreamingResponse(
                    render.stream(first, deltas, prepared.token_ids, include_usage, body.return_token_ids),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            else:
                response = await _cancel_on_disconnect(
                    request, complete(route, body, deltas, prepared, render, started)
                )
        except MMServeError as exc:
            metrics.requests.labels(route, str(exc.http_status)).inc()
            raise
        metrics.requests.labels(route, "ok").inc()
        metrics.e2e.labels(route).observe(time.monotonic() - started)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body)
        request_id = new_request_id("chatcmpl")
        # Content is passed as typed parts; the prompt adapter turns them into a string for a chat
        # template that reads string content (gateway/chat_template.py).
        messages = [
            {
                "role": m.role,
                "content": [{"type": "text", "text": m.content or ""}]
                if not isinstance(m.content, list)
                else [
                    {"type": "text", "text": p.text} if p.type == "text" else {"type": "image", "url": p.url}
                    for p in m.content
                ],
            }
            for m in body.messages
        ]
        text, urls = await asyncio.to_thread(core.chat_prompt, messages, body.chat_template_kwargs)
        return await run(request, "chat", body, text, urls, request_id, _ChatRender(request_id, model_name))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        request_id = new_request_id("cmpl")
        text = core.prompt.normalize_raw(body.prompt)
        return await run(
            request, "completions", body, text, body.urls, request_id, _TextRender(request_id, model_name)
        )

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _logprob(value: float) -> float:
    """JSON has no -inf (a token the model rules out): vLLM's stand-in."""
    return value if math.isfinite(value) else -9999.0


def _token_json(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode("utf-8"))}


class _Render:
    """Builds response bodies of one route; subclasses say how a choice and a delta look."""

    object_full = object_chunk = ""

    def __init__(self, request_id: str, model: str):
        self.request_id, self.model, self.created = request_id, model, int(time.time())

    def full_choice(self, text: str) -> dict:
        raise NotImplementedError

    def stream_head(self) -> dict | None:
        raise NotImplementedError

    def chunk_choice(self, text: str) -> dict:
        raise NotImplementedError

    def logprobs_json(self, entries: list[TokenLogprob]) -> dict:
        raise NotImplementedError

    def choice(self, body: dict, logprobs: list[TokenLogprob] | None, finish_reason: str | None) -> dict:
        """A choice: its route-specific `body`, then `logprobs` (null when not requested), finish_reason."""
        lp = None if logprobs is None else self.logprobs_json(logprobs)
        return {"index": 0, **body, "logprobs": lp, "finish_reason": finish_reason}

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def full(
        self,
        text: str,
        ids: list[int],
        last: TextDelta,
        prompt_ids: list[int],
        with_ids: bool,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict:
        assert last.usage is not None, "the last delta carries usage"
        choice = self.choice(self.full_choice(text), logprobs, last.finish_reason)
        extra: dict[str, Any] = {"usage": usage_json(last.usage)}
        if with_ids:
            choice["token_ids"] = ids
            extra["prompt_token_ids"] = prompt_ids
        return self.envelope(self.object_full, [choice], **extra)

    async def stream(
        self,
        first: TextDelta,
        rest: AsyncGenerator[TextDelta, None],
        prompt_ids,
        include_usage: bool,
        with_ids: bool,
    ):
        try:
            head = self.stream_head()
            if head is not None:
                yield _sse(self.envelope(self.object_chunk, [self.choice(head, None, None)]))
            delta: TextDelta | None = first
            usage = None
            while delta is not None:
                choice = self.choice(self.chunk_choice(delta.text), delta.logprobs, delta.finish_reason)
                if with_ids:
                    choice["token_ids"] = delta.token_ids
                yield _sse(self.envelope(self.object_chunk, [choice]))
                usage = delta.usage
                delta = await anext(rest, None)
            if include_usage and usage is not None:
                yield _sse(self.envelope(self.object_chunk, [], usage=usage_json(usage)))
            yield "data: [DONE]\n\n"
        except MMServeError as exc:
            yield _sse(error_json(exc))
            yield "data: [DONE]\n\n"
        finally:
            await rest.aclose()  # done, or the client went away: stop the generation


class _ChatRender(_Render):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def full_choice(self, text):
        return {"message": {"role": "assistant", "content": text}}

    def stream_head(self):
        return {"delta": {"role": "assistant", "content": ""}}

    def chunk_choice(self, text):
        return {"delta": {"content": text} if text else {}}

    def logprobs_json(self, entries):
        """OpenAI chat's shape: per token its string, bytes, logprob and the top alternatives."""
        return {
            "content": [
                {**_token_json(e.token, e.logprob), "top_logprobs": [_token_json(t, v) for t, v in e.top]}
                for e in entries
            ]
        }


class _TextRender(_Render):
    object_full = object_chunk = "text_completion"

    def full_choice(self, text):
        return {"text": text}

    def stream_head(self):
        return None

    def chunk_choice(self, text):
        return {"text": text}

    def logprobs_json(self, entries):
        """Legacy completions' shape: parallel lists; each top_logprobs dict holds the alternatives and,
        as OpenAI documents, always the sampled token (so up to n + 1 entries; tokens whose strings
        coincide share one key, the likelier one's)."""
        top_logprobs = []
        for e in entries:
            top: dict[str, float] = {}
            for token, value in [*e.top, (e.token, e.logprob)]:
                top.setdefault(token, _logprob(value))
            top_logprobs.append(top)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": top_logprobs,
            "text_offset": [e.text_offset for e in entries],
        }
