"""Load for the compose fault checks: 32 streams and 8 plain chat requests in flight, each request's end
classified from what its client saw (tests/compose/compose_check.py kills a backend under it).

completed: a 200 with every event up to a finish_reason and [DONE] (a plain 200 for non-streamed);
clean error: an error status with OpenAI's error body, or an SSE error event followed by [DONE];
dropped: anything else (a stream cut without [DONE], [DONE] without a finish_reason or an error
event, a broken connection, an error body not in OpenAI's shape); hang: not ended by the deadline.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import threading
import time
from dataclasses import dataclass

import httpx
from PIL import Image

STREAMS, PLAIN = 32, 8


@dataclass
class Outcome:
    kind: str  # completed | clean error | dropped | hang
    detail: str = ""


def image_url(seed: int) -> str:
    """A small PNG data URL whose pixels depend on `seed` (a different image: a vision cache miss)."""
    img = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, 128))
    img.putpixel((seed % 64, (seed // 64) % 48), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(model: str, seed: int, max_tokens: int) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": image_url(seed)}},
        {"type": "text", "text": "What is in the image?"},
    ]
    messages = [{"role": "user", "content": content}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}


def _error_outcome(response: httpx.Response) -> Outcome:
    try:
        error = response.json()["error"]
        return Outcome("clean error", f"HTTP {response.status_code}: {error['message'][:120]}")
    except (ValueError, KeyError, TypeError):
        return Outcome("dropped", f"HTTP {response.status_code} not in OpenAI's shape: {response.text[:120]}")


def _read_events(response: httpx.Response, first_event: threading.Event) -> Outcome:
    finished, error, done = False, None, False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        first_event.set()
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"].get("message", "?")
        elif any(choice.get("finish_reason") for choice in event.get("choices", [])):
            finished = True
    if done and error is not None:
        return Outcome("clean error", f"error event: {error[:120]}")
    if done and finished:
        return Outcome("completed")
    return Outcome("dropped", "[DONE] without a finish_reason or an error event" if done else "no [DONE]")


def streamed(client: httpx.Client, body: dict, first_event: threading.Event) -> Outcome:
    try:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                return _error_outcome(response)
            return _read_events(response, first_event)
    except httpx.HTTPError as exc:
        return Outcome("dropped", f"{type(exc).__name__}: {exc}")
    finally:
        first_event.set()


def plain(client: httpx.Client, body: dict) -> Outcome:
    try:
        response = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return Outcome("dropped", f"{type(exc).__name__}: {exc}")
    return Outcome("completed") if response.status_code == 200 else _error_outcome(response)


class Load:
    """Requests running on their own threads, each ending in an Outcome."""

    def __init__(self, base: str, headers: dict[str, str], model: str, max_tokens: int):
        self.client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(300, connect=10))
        self.model, self.max_tokens = model, max_tokens
        self.outcomes: list[Outcome | None] = []
        self.threads: list[threading.Thread] = []
        self.first_events: list[threading.Event] = []

    def start(self, streams: int, plains: int, seed: int) -> None:
        for i in range(streams + plains):
            body = chat_body(self.model, seed + i, self.max_tokens)
            if i < streams:
                event = threading.Event()
                self.first_events.append(event)
                self._spawn(lambda body=body, event=event: streamed(self.client, body, event))
            else:
                self._spawn(lambda body=body: plain(self.client, body))

    def _spawn(self, request) -> None:
        index = len(self.outcomes)
        self.outcomes.append(None)

        def run() -> None:
            self.outcomes[index] = request()

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def wait_streaming(self, timeout: float) -> int:
        """Wait until every stream has had its first event (or ended); returns how many had."""
        until = time.monotonic() + timeout
        for event in self.first_events:
            event.wait(max(0.0, until - time.monotonic()))
        return sum(event.is_set() for event in self.first_events)

    def finish(self, deadline: float) -> list[Outcome]:
        """Every outcome, a request still running at `deadline` (time.monotonic()) counted as a hang."""
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [outcome or Outcome("hang") for outcome in self.outcomes]


def report(title: str, outcomes: list[Outcome]) -> str:
    """One line per outcome kind, with the first detail of each."""
    counts = collections.Counter(outcome.kind for outcome in outcomes)
    lines = [f"{title}: {len(outcomes)} requests"]
    for kind in ("completed", "clean error", "dropped", "hang"):
        example = next((o.detail for o in outcomes if o.kind == kind and o.detail), "")
        lines.append(f"  {kind:12s} {counts[kind]:3d}  {example}")
    return "\n".join(lines)


class HealWatch:
    """Polls the gateway's /health from a kill on, and notes when it first answers 200 again."""

    def __init__(self, base: str, t_kill: float, timeout: float):
        self.base, self.t_kill, self.until = base, t_kill, t_kill + timeout
        self.healed_after: float | None = None  # seconds after the kill
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while time.monotonic() < self.until:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    self.healed_after = time.monotonic() - self.t_kill
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def wait(self) -> float | None:
        """Seconds from the kill to /health 200, or None when it never came back."""
        self._thread.join(max(0.0, self.until - time.monotonic()))
        return self.healed_after
