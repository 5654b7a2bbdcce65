"""The OpenAI-compatible HTTP surface: thin routes over ServingCore, one error handler."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway.generation_defaults import GenerationDefaults
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.serving import GenerationSettings, ServingCore, TextDelta, TokenLogprob, new_request_id
from mmserve.errors import InvalidInputError, MMServeError, NotFoundError
from mmserve.wire import PixelLimits, SamplingParams, Usage

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


def printable(text: str) -> str:
    """`text` safe to send: a lone surrogate (user input echoed in an error) becomes a backslash escape
    instead of failing the response's UTF-8 encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clip(text: str, limit: int = 80) -> str:
    """User input quoted in an error message: short, and encodable."""
    return printable(text if len(text) <= limit else text[: limit - 3] + "...")


def error_body(
    message: str, kind: str, status: int, param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error shape; `code` is a string or null, as the official API sends it. Every error body
    is built here, and its strings are made encodable here: building an error never raises."""
    return {
        "error": {
            "message": printable(message),
            "type": kind,
            "param": None if param is None else printable(param),
            "code": code,
        }
    }


def error_json(exc: MMServeError) -> dict:
    return error_body(str(exc), exc.error_type, exc.http_status, param=exc.param, code=exc.code)


async def _send_json(send, status: int, payload: dict) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


class Metrics:
    """Every response by route and status (counted as its status is sent, whatever sent it: a route, an
    error handler, the auth or body-size check); for chat and completions requests that passed
    validation, how they ended and their end-to-end latency, recorded when the response ends (for a
    stream: its last event sent, or the client gone)."""

    OUTCOMES = ("completed", "error", "client_disconnected")

    def __init__(self):
        self.registry = CollectorRegistry()
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

    def ended(self, route: str, outcome: str, started: float) -> None:
        self.outcomes.labels(route, outcome).inc()
        self.e2e.labels(route, outcome).observe(time.monotonic() - started)


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


class _CountResponses:
    """ASGI middleware, the outermost: counts every response by route and status code as it starts (a
    request that ends in an unhandled exception counts as 500, one whose client left first as 499)."""

    def __init__(self, app, metrics: Metrics, routes: list):
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, path: str) -> str:
        # Only paths of routes become labels: a client cannot grow the label set.
        known = any(getattr(route, "path", None) == path for route in self.routes)
        return path if known else "unknown"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.requests.labels(self._route(scope["path"]), str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except BaseException as exc:
            if not started:
                # 499 (nginx's "client closed request"): the client left before its response began
                gone = isinstance(exc, asyncio.CancelledError | ClientDisconnect)
                self.metrics.requests.labels(self._route(scope["path"]), "499" if gone else "500").inc()
            raise


class _Auth:
    """ASGI middleware: /v1/ requests without the API key get 401, before their body is read."""

    def __init__(self, app, expected: bytes | None):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if self.expected and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("invalid or missing API key", "authentication_error", 401)
                return await _send_json(send, 401, body)
        await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: the body is read here, before the app parses anything, and a body over `limit`
    bytes gets 413 at once, its rest unread: declared by Content-Length, or found while reading a chunked
    one. The app then receives the body in one message (FastAPI reads all of it anyway), and after that
    the client's own messages (a disconnect)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before its body arrived: nobody to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await self._reject(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        chunks.clear()

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        message = f"request body is over the {self.limit} byte limit"
        await _send_json(send, 413, error_body(message, "invalid_request_error", 413))


def _param(loc: tuple) -> str | None:
    """A pydantic error location as the request field it names: `messages[0].content[1].image_url.url`.
    Segments that are not identifiers are left out: union tags (gateway/protocol.py) and keys a client
    chose (named by their parent field)."""
    out = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            out += f"[{part}]" if out else ""
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
    return out or None


def validation_error_body(errors: list[dict]) -> dict:
    """The first of pydantic's (or FastAPI's body-parsing) errors in OpenAI's shape, `param` naming the
    field and starting the message; errors about the body as a whole have `param` null."""
    first = errors[0] if errors else {}
    kind, msg = first.get("type", ""), str(first.get("msg", "invalid request"))
    msg = msg.removeprefix("Value error, ")
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON: {reason}".rstrip(": ")
        return error_body(message, "invalid_request_error", 400)
    param = _param(tuple(first.get("loc", ())))
    if param is None:
        if kind == "missing":
            message = "the request body is missing: send a JSON object (Content-Type: application/json)"
        else:
            message = f"the request body must be a JSON object (Content-Type: application/json): {msg}"
        return error_body(message, "invalid_request_error", 400)
    return error_body(f"{param}: {msg}", "invalid_request_error", 400, param)


class _MeteredStream(StreamingResponse):
    """The one place a streamed generation ends. Whichever way it ends (its last event sent, an error
    turned into an error event + [DONE], the client gone), the generation is closed, then `on_end` is
    called once with the outcome: completed, error or client_disconnected."""

    def __init__(self, events: AsyncGenerator[str, None], generation: AsyncIterator, on_end, **kwargs):
        self._events, self._generation, self._on_end = events, generation, on_end
        self._outcome: str | None = None
        super().__init__(self._guarded(), **kwargs)

    async def _guarded(self):
        try:
            async for event in self._events:
                yield event
        except MMServeError as exc:  # after the status was sent: the error travels as an event
            self._outcome = "error"
            yield _sse(error_json(exc))
            yield "data: [DONE]\n\n"
            return
        except Exception:
            self._outcome = "error"
            raise
        self._outcome = "completed"  # the consumer asked past the last event: all of them were sent

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: when the client went away this task is being cancelled, and the generation must
            # still be closed (that cancels it in the engine).
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._events.aclose()
                await self._generation.aclose()  # type: ignore[attr-defined]  # an async generator
            self._on_end(self._outcome or "client_disconnected")


def create_app(
    core: ServingCore,
    model_name: str,
    api_key: str | None = None,
    backends: dict | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """`backends` maps a name to a gRPC channel whose health /health reports (None in-process)."""
    app = FastAPI(title="mmserve gateway")
    metrics = app.state.metrics = Metrics()
    # Outermost last: count every response, then the API key, then the body size, then FastAPI.
    app.add_middleware(_BodyLimit, limit=max_request_bytes)
    app.add_middleware(_Auth, expected=f"Bearer {api_key}".encode() if api_key else None)
    app.add_middleware(_CountResponses, metrics=metrics, routes=app.router.routes)

    @app.exception_handler(MMServeError)
    async def _domain_error(request: Request, exc: MMServeError):
        if exc.http_status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.http_status, exc)
        return JSONResponse(error_json(exc), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {clip(request.url.path)}"
        return JSONResponse(
            error_body(message, "invalid_request_error", exc.status_code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("%s %s -> 500", request.method, clip(request.url.path))
        return JSONResponse(error_body("internal server error", "internal_error", 500), status_code=500)

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
            raise NotFoundError(
                f"model: the model `{clip(body.model)}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
            )

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

    async def run(
        request: Request,
        route: str,
        body,
        text: str,
        urls: list[str],
        request_id: str,
        render,
        prompt_param: str,
    ):
        started = time.monotonic()
        settings = GenerationSettings(sampling_params(body, core.defaults), body.token_limit, body.stop_list)
        if body.mm_processor_kwargs is not None:
            kwargs = body.mm_processor_kwargs
            settings.pixels = PixelLimits(kwargs.min_pixels, kwargs.max_pixels)
        outcome: str | None = "error"  # None: the stream records its own end
        try:
            prepared = await _cancel_on_disconnect(
                request, core.prepare(text, urls, request_id, settings.pixels, prompt_param=prompt_param)
            )
            deltas = core.generate(
                prepared,
                settings,
                request_id,
                prompt_param=prompt_param,
                max_tokens_param=body.token_limit_field,
            )
            if body.stream:
                # errors before the first token still get a status code
                first = await _cancel_on_disconnect(request, anext(deltas))
                metrics.ttft.observe(time.monotonic() - started)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                response: Response = _MeteredStream(
                    render.stream(first, deltas, prepared.token_ids, include_usage, body.return_token_ids),
                    deltas,
                    lambda ended: metrics.ended(route, ended, started),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
                outcome = None
            else:
                response = await _cancel_on_disconnect(
                    request, complete(route, body, deltas, prepared, render, started)
                )
                outcome = "completed"
            return response
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        finally:
            if outcome is not None:
                metrics.ended(route, outcome, started)

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
        try:
            text, urls = await asyncio.to_thread(core.chat_prompt, messages, body.chat_template_kwargs)
        except InvalidInputError as exc:  # the messages' text or the template refused them
            if exc.param is not None:
                raise
            raise InvalidInputError(f"messages: {exc}", param="messages", code=exc.code) from None
        route, render = "/v1/chat/completions", _ChatRender(request_id, model_name)
        return await run(request, route, body, text, urls, request_id, render, "messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        request_id = new_request_id("cmpl")
        text = core.prompt.normalize_raw(body.prompt)
        route, render = "/v1/completions", _TextRender(request_id, model_name)
        return await run(request, route, body, text, body.urls, request_id, render, "prompt")

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
        """The events of a stream; _MeteredStream turns an error into an error event and closes `rest`."""
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
