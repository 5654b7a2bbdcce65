"""Domain errors shared by the services, and the one table of how each crosses a boundary.

Each error class names its gRPC status code and its HTTP status/OpenAI error type; the gRPC
servers, the gateway's gRPC clients and the HTTP error handler all read these attributes.
"""

from __future__ import annotations


class MMServeError(Exception):
    """Base class of errors that carry a message meant for the client."""

    grpc_code = "INTERNAL"
    http_status = 500
    error_type = "internal_error"

    def __init__(self, *args, param: str | None = None, code: str | None = None):
        """`param`: the request field at fault (OpenAI's error `param`, e.g. "messages[0].content");
        `code`: OpenAI's machine-readable error code (e.g. "model_not_found"). Both are for the HTTP
        error body only; gRPC carries the message."""
        super().__init__(*args)
        self.param, self.code = param, code


class InvalidInputError(MMServeError):
    """The request is malformed."""

    grpc_code, http_status, error_type = "INVALID_ARGUMENT", 400, "invalid_request_error"


class OverloadedError(MMServeError):
    """A bounded queue is full."""

    grpc_code, http_status, error_type = "RESOURCE_EXHAUSTED", 429, "rate_limit_error"


class NotFoundError(MMServeError):
    """A referenced object is not held, e.g. a hash-only image not in the cache, or an unknown model."""

    grpc_code, http_status, error_type = "NOT_FOUND", 404, "not_found_error"


class UnavailableError(MMServeError):
    """A backend service cannot be reached or is not serving."""

    grpc_code, http_status, error_type = "UNAVAILABLE", 503, "service_unavailable"


class DeadlineError(MMServeError):
    """The request's deadline passed."""

    grpc_code, http_status, error_type = "DEADLINE_EXCEEDED", 504, "timeout"


class CheckpointError(MMServeError):
    """A checkpoint folder cannot be served (a startup error)."""

    grpc_code = "FAILED_PRECONDITION"


def error_for_grpc_code(code_name: str) -> type[MMServeError]:
    """The domain error a gRPC status code name maps back to (MMServeError when none does)."""
    for cls in (InvalidInputError, OverloadedError, NotFoundError, UnavailableError, DeadlineError):
        if cls.grpc_code == code_name:
            return cls
    if code_name == "OUT_OF_RANGE":
        return InvalidInputError
    return MMServeError
