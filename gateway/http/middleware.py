"""ASGI middleware around the app: response counting, the API key, the cap on requests in flight, the
request body size limit."""

from __future__ import annotations

import asyncio
import hmac

from starlette.requests import ClientDisconnect

from gateway.http.errors import RETRY_AFTER, RETRY_AFTER_S, send_error
from gateway.http.metrics import Metrics


class CountResponses:
    """The outermost: counts every response by route and status code as it starts (a request that ends
    in an unhandled exception counts as 500, one whose client left first as 499)."""

    def __init__(self, app, metrics: Metrics, paths: frozenset[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    def _route(self, path: str) -> str:
        # Only paths of routes become labels: a client cannot grow the label set.
        return path if path in self.paths else "unknown"

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


class Auth:
    """/v1/ requests without the API key get 401, before their body is read."""

    def __init__(self, app, expected: bytes | None):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if self.expected and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await send_error(send, 401, "invalid or missing API key", "authentication_error")
        await self.app(scope, receive, send)


class PendingLimit:
    """At most `limit` POSTs to `paths` (chat and completions) in flight, a stream until its last event:
    one more gets 429 with Retry-After at once, before its body is read or any work starts. (One event
    loop: the count needs no lock.)"""

    def __init__(self, app, limit: int, paths: frozenset[str], metrics: Metrics):
        self.app, self.limit, self.paths, self.metrics = app, limit, paths, metrics
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        if self.pending >= self.limit:
            message = (
                f"the server is at its limit of {self.limit} requests in flight "
                f"(MAX_PENDING_REQUESTS); retry after {RETRY_AFTER_S} s"
            )
            return await send_error(send, 429, message, "rate_limit_error", RETRY_AFTER)
        self.pending += 1
        self.metrics.pending.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.pending -= 1
            self.metrics.pending.dec()


class BodyLimit:
    """The body is read here, before the app parses anything, and a body over `limit` bytes gets 413 at
    once, its rest unread: declared by Content-Length, or found while reading a chunked one. The app
    then receives the body in one message (FastAPI reads all of it anyway), and after that the
    client's own messages (a disconnect)."""

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
        await send_error(send, 413, f"request body is over the {self.limit} byte limit")
