"""The one place a streamed generation ends: its events sent, the generation closed, its outcome recorded."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import anyio
from fastapi.responses import StreamingResponse

from gateway.http.errors import error_json
from gateway.http.render import DONE, sse
from gateway.serving import TextDelta
from mmserve.errors import MMServeError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class MeteredStream(StreamingResponse):
    """Server-sent events of one generation. Whichever way the stream ends (its last event sent, an
    error turned into an error event + [DONE], the client gone), the generation is closed, then
    `on_end` is called once with the outcome: completed, error or client_disconnected."""

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        generation: AsyncGenerator[TextDelta, None],
        on_end: Callable[[str], None],
    ):
        self._events, self._generation, self._on_end = events, generation, on_end
        self._outcome: str | None = None
        super().__init__(self._guarded(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _guarded(self) -> AsyncGenerator[str, None]:
        try:
            async for event in self._events:
                yield event
        except MMServeError as exc:  # after the status was sent: the error travels as an event
            self._outcome = "error"
            yield sse(error_json(exc))
            yield DONE
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
                await self._generation.aclose()
            self._on_end(self._outcome or "client_disconnected")
