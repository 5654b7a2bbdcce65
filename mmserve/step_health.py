"""Whether a service's model forward still works: the state behind its readiness (gRPC health)."""

from __future__ import annotations

import torch

# A forward that fails this many times in a row is not a bad batch but a broken engine.
MAX_CONSECUTIVE_FAILURES = 3


def is_fatal(exc: BaseException) -> bool:
    """Errors that leave the device unusable for every later forward: a CUDA error is sticky (the
    context is poisoned until the process exits). An out-of-memory error is not: it fails its batch."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "device-side assert" in str(exc))


def describe(exc: BaseException) -> str:
    """A one-line, bounded account of an error for a client's message (the traceback stays in the log)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class StepHealth:
    """A failed forward fails only its batch, and a successful one resets the count. `limit` failures
    in a row, or one fatal error, fail the service for good: its health turns NOT_SERVING and only a
    restart heals it. Not healing in place is deliberate: a failure that repeats is state gone bad
    (a corrupted buffer, a poisoned CUDA context) that a later success would not prove fixed, and a
    replica taken out of rotation gets no traffic to prove anything with."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_FAILURES):
        self.limit = limit
        self.consecutive_failures = 0
        self.reason: str | None = None  # why the service failed; None while it serves

    @property
    def ok(self) -> bool:
        return self.reason is None

    def succeeded(self) -> None:
        self.consecutive_failures = 0

    def failed(self, exc: BaseException, what: str) -> bool:
        """Count a failed `what` (e.g. "engine step"); True when the service has now failed for good."""
        self.consecutive_failures += 1
        if self.ok and (is_fatal(exc) or self.consecutive_failures >= self.limit):
            count = self.consecutive_failures
            self.reason = f"{count} consecutive {what} failures, the last {describe(exc)}"
            if count == 1:
                self.reason = f"a fatal {what} failure ({describe(exc)})"
        return not self.ok
