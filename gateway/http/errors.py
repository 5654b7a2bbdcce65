"""Every HTTP error body, in OpenAI's shape, and the FastAPI exception handlers that send them."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmserve.errors import MMServeError, OverloadedError

log = logging.getLogger(__name__)

# What a 429 asks the client to wait (seconds): a slot in a full queue frees as soon as one request ends.
RETRY_AFTER_S = 1
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}


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


async def send_error(
    send,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> None:
    """An error response sent from ASGI middleware (before FastAPI: the API key, the body size, the
    limit on requests in flight)."""
    extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    headers_sent = [(b"content-type", b"application/json"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers_sent})
    body = json.dumps(error_body(message, kind, status)).encode()
    await send({"type": "http.response.body", "body": body})


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


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MMServeError)
    if exc.http_status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.http_status, exc)
    headers = RETRY_AFTER if isinstance(exc, OverloadedError) else None  # a full queue: come back soon
    return JSONResponse(error_json(exc), status_code=exc.http_status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no such route: {request.method} {clip(request.url.path)}"
    return JSONResponse(
        error_body(message, "invalid_request_error", exc.status_code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s -> 500", request.method, clip(request.url.path))
    return JSONResponse(error_body("internal server error", "internal_error", 500), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """The one mapping of failures to HTTP responses: domain errors by their class's status, invalid
    bodies as 400s naming the field, unknown routes as 404s, anything else as a logged 500."""
    app.add_exception_handler(MMServeError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)
