"""SIGTERM to the gateway drains: short streams in flight finish normally, a stream still running at
the drain deadline ends with an error event and [DONE] (never a silent cut), new connections are
refused, and the gateway exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import serving

DRAIN_S = 4


def stream(base_url: str, max_tokens: int, started: threading.Event, out: dict) -> None:
    payload = {
        "messages": [{"role": "user", "content": "Tell a story."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=payload, timeout=120) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    out["events"] = events


def test_sigterm_finishes_short_streams_and_ends_long_ones_with_an_error(
    tiny_checkpoint, image_dir, tmp_path
):
    args = ["--drain-timeout", str(DRAIN_S)]
    with serving(tiny_checkpoint, image_dir, tmp_path, extra_args=args) as (stack, _):
        lengths = {"short-1": 24, "short-2": 40, "long-1": 3000, "long-2": 3000}
        results = {name: {} for name in lengths}
        threads = []
        for name, max_tokens in lengths.items():
            started = threading.Event()
            thread = threading.Thread(
                target=stream, args=(stack.base_url, max_tokens, started, results[name])
            )
            thread.start()
            assert started.wait(60), f"{name} never started streaming"
            threads.append(thread)
        gateway = stack.procs["gateway"]
        signalled = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # new connections are refused, not left hanging
            httpx.get(stack.base_url + "/health", timeout=5)
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a stream hung through the drain"
        assert gateway.wait(30) == 0
        print(f"gateway exited {time.monotonic() - signalled:.1f}s after SIGTERM (drain {DRAIN_S}s)")

    for name, result in results.items():
        events = result["events"]
        assert result["status"] == 200 and events[-1] == "[DONE]", (name, events[-3:])
        chunks = [json.loads(e) for e in events[:-1]]
        errors = [c for c in chunks if "error" in c]
        if name.startswith("short"):
            assert not errors, (name, errors)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        else:
            assert len(errors) == 1 and errors[0] is chunks[-1], (name, chunks[-2:])
            assert "shutting down" in errors[0]["error"]["message"]
            assert errors[0]["error"]["type"] == "service_unavailable"
