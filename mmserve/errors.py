"""Domain errors shared by the services; each process maps them to its wire status in one place."""


class MMServeError(Exception):
    """Base class of errors that carry a message meant for the client."""


class InvalidInputError(MMServeError):
    """The request is malformed (gRPC INVALID_ARGUMENT, HTTP 400)."""


class OverloadedError(MMServeError):
    """A bounded queue is full (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class CheckpointError(MMServeError):
    """A checkpoint folder cannot be served (startup error)."""


class UnavailableError(MMServeError):
    """A backend service cannot be reached (gRPC UNAVAILABLE, HTTP 503)."""


class DeadlineError(MMServeError):
    """A backend did not answer in time (gRPC DEADLINE_EXCEEDED, HTTP 504)."""


class NotFoundError(MMServeError):
    """A referenced object is not held (gRPC NOT_FOUND), e.g. a hash-only image not in the cache."""
