"""The gateway's graceful shutdown: a grace period for the generations still running."""

from __future__ import annotations

import asyncio


class Drain:
    """The gateway's shutdown: after `start(grace_s)`, generations still running when the grace period
    ends stop with UnavailableError (a 503, or an SSE error event + [DONE]) instead of being cut."""

    def __init__(self):
        self.started = False
        self.expired = False

    def start(self, grace_s: float) -> None:
        if not self.started:
            self.started = True
            asyncio.get_running_loop().call_later(grace_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
