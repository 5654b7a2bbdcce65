"""The shared secret between the gateway and the gRPC services: where it comes from, how calls carry it,
and the server interceptor that refuses calls without it."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV, TOKEN_FILE_ENV = "MMSERVE_INTERNAL_TOKEN", "MMSERVE_INTERNAL_TOKEN_FILE"
# Probes (compose healthchecks, Kubernetes gRPC probes, grpcurl's listing) send no metadata.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """The secret from the flag/env value or from a file (compose and Kubernetes secrets), None = off.
    ValueError (a start-up error) for both at once, a missing file, or an empty secret."""
    if token and token_file:
        raise ValueError(f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{TOKEN_FILE_ENV}={token_file}: cannot read it ({exc.strerror})") from None
        if not token:
            raise ValueError(f"{TOKEN_FILE_ENV}={token_file}: the file is empty")
    return token or None


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """What a client adds to every call (nothing when the secret is off)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def log_state(token: str | None, effect: str) -> None:
    """The one start-up line saying whether the secret is on and what it does (never the secret)."""
    if token:
        log.info("internal token on: %s", effect)
    else:
        log.info("internal token off (%s / %s unset)", TOKEN_ENV, TOKEN_FILE_ENV)


class RequireToken(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection with UNAUTHENTICATED unless its metadata carries
    `authorization: Bearer <token>` (compared in constant time). The refusal reads no request message."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given is None:
            return _refusal(
                handler,
                f"missing internal token: {details.method} needs 'authorization: Bearer "
                f"<token>' metadata (the services' {TOKEN_ENV})",
            )
        if not hmac.compare_digest(str(given).encode(), self._expected):
            return _refusal(handler, f"invalid internal token for {details.method} (check {TOKEN_ENV})")
        return handler


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts (no deserializer: the bytes stay unread)."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse)
