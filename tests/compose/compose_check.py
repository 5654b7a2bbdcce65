"""Checks against a running `docker compose` stack (driven by tests/compose/run.sh, not by pytest).

1. a chat request with an image through the published gateway port, with the official `openai` client;
   the answer is checked (576 image tokens in the prompt, tokens out, greedy = deterministic, stream =
   non-stream);
2. the `llm` container is killed (SIGKILL to its PID 1, as an OOM kill or crash would) while a request
   is in flight: that request and the next ones end promptly (503 in OpenAI's error shape, never a hang),
   /health says 503 naming llm;
3. the restart policy brings llm back and the gateway answers again, with the same greedy answer.

Usage: python tests/compose/compose_check.py --port 8000 --project mmserve-test [--engine podman]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
from PIL import Image

PROMPT = "What is in the image?"


def log(msg: str) -> None:
    print(f"[compose-check {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def image_data_url() -> str:
    img = Image.new("RGB", (64, 48))
    for x in range(64):
        for y in range(48):
            img.putpixel((x, y), (x * 4, y * 5, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(client: openai.OpenAI, model: str, image: str | None, **kw):
    content: list[dict] = [{"type": "text", "text": PROMPT}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def container(engine: str, project: str, service: str) -> dict:
    name = f"{project}_{service}_1"
    out = subprocess.run([engine, "inspect", name], check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--engine", default="podman")
    p.add_argument("--recover-timeout", type=float, default=240)
    return p.parse_args()


def check_chat_with_image(client: openai.OpenAI, base: str, model: str, image: str) -> str:
    """Step 1: a real chat request with an image; returns the greedy answer."""
    first = chat(client, model, image, max_tokens=16)
    text = first.choices[0].message.content
    usage = first.usage
    assert usage is not None
    log(f"answer: {text!r} finish={first.choices[0].finish_reason} usage={usage.model_dump()}")
    assert isinstance(text, str) and first.choices[0].finish_reason in ("stop", "length"), first
    assert usage.completion_tokens >= 1, usage
    text_only = chat(client, model, None, max_tokens=1).usage
    assert text_only is not None
    image_tokens = usage.prompt_tokens - text_only.prompt_tokens
    log(f"prompt tokens: {usage.prompt_tokens} with the image, {text_only.prompt_tokens} without")
    assert image_tokens >= 576, f"the image added {image_tokens} prompt tokens, LLaVA-1.5 geometry gives 576"
    again = chat(client, model, image, max_tokens=16)
    assert again.choices[0].message.content == text, "greedy decoding is not deterministic"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(client, model, image, max_tokens=16, stream=True)
        if c.choices
    )
    assert streamed == text, (streamed, text)
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200, health.text
    log("chat with an image OK (deterministic, stream == non-stream), /health 200")
    return text


def kill_llm_during_request(
    args: argparse.Namespace, client: openai.OpenAI, model: str, image: str
) -> tuple[dict, float]:
    """Step 2, first half: SIGKILL llm while a request is in flight; that request must end promptly.

    Returns the llm container as it was before the kill, and the kill's time."""
    before = container(args.engine, args.project, "llm")
    result: dict = {}

    def in_flight():
        t = time.monotonic()
        try:
            r = chat(client, model, image, max_tokens=3000, extra_body={"ignore_eos": True})
            result["outcome"] = f"completed ({r.usage.completion_tokens if r.usage else '?'} tokens)"
        except openai.APIStatusError as exc:
            result["outcome"] = f"HTTP {exc.status_code}: {exc.message}"
            result["status"] = exc.status_code
        except Exception as exc:  # noqa: BLE001 - reported below
            result["outcome"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = time.monotonic() - t

    worker = threading.Thread(target=in_flight, daemon=True)
    worker.start()
    time.sleep(1.0)
    pid = before["State"]["Pid"]
    log(f"killing the llm container ({before['Name']}, PID 1 = host pid {pid}) with SIGKILL")
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=30)
    assert not worker.is_alive(), "the in-flight request hangs after the llm container died"
    log(f"in-flight request: {result['outcome']} after {result['seconds']:.1f}s")
    return before, t_kill


def check_llm_down(client: openai.OpenAI, base: str, model: str, image: str) -> None:
    """Step 2, second half: new requests while llm is down end promptly with 503; /health names llm."""
    t = time.monotonic()
    try:
        chat(client, model, image, max_tokens=8)
        raise AssertionError("a request succeeded while llm was down")
    except openai.APIStatusError as exc:
        took = time.monotonic() - t
        log(f"new request while llm is down: HTTP {exc.status_code} in {took:.2f}s: {exc.body}")
        assert exc.status_code == 503, exc
        assert isinstance(exc.body, dict) and "llm service is unavailable" in exc.body.get("message", "")
        assert took < 10, f"503 took {took:.1f}s"
    health = httpx.get(base + "/health", timeout=10)
    log(f"/health while llm is down: {health.status_code} {health.text}")
    assert health.status_code == 503 and "llm" in health.json()["backends"], health.text


def check_recovery(
    args: argparse.Namespace,
    client: openai.OpenAI,
    base: str,
    model: str,
    image: str,
    text: str,
    before: dict,
    t_kill: float,
) -> None:
    """Step 3: the restart policy brings llm back; the gateway (never restarted) answers again."""
    deadline = time.monotonic() + args.recover_timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            back = chat(client, model, image, max_tokens=16)
            break
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1)
    recovered = time.monotonic() - t_kill
    after = container(args.engine, args.project, "llm")
    log(
        f"recovered {recovered:.1f}s after the kill ({attempts} tries); llm restarts: "
        f"{before.get('RestartCount', 0)} -> {after.get('RestartCount', 0)}, state {after['State']['Status']}"
    )
    assert back.choices[0].message.content == text, (back.choices[0].message.content, text)
    assert after["State"]["Pid"] != before["State"]["Pid"]
    gw = container(args.engine, args.project, "gateway")
    assert gw["State"]["Status"] == "running" and gw.get("RestartCount", 0) == 0, "gateway restarted"
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200, health.text
    log("llm restarted by the restart policy, same greedy answer, /health 200")


def main() -> int:
    args = parse_args()
    base = f"http://127.0.0.1:{args.port}"
    client = openai.OpenAI(
        base_url=base + "/v1", api_key=os.environ.get("API_KEY") or "unused", max_retries=0, timeout=60
    )
    image = image_data_url()

    model = client.models.list().data[0].id
    log(f"model: {model}")
    text = check_chat_with_image(client, base, model, image)
    before, t_kill = kill_llm_during_request(args, client, model, image)
    check_llm_down(client, base, model, image)
    check_recovery(args, client, base, model, image, text, before, t_kill)
    return 0


T0 = time.monotonic()

if __name__ == "__main__":
    sys.exit(main())
