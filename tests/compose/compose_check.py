"""Checks against a running `docker compose` stack (driven by tests/compose/run.sh, not by pytest).

1. a chat request with an image through the published gateway port, with the official `openai` client;
   the answer is checked (576 image tokens in the prompt, tokens out, greedy = deterministic, stream =
   non-stream);
2. faults under load, for the `llm` container and then the `vision` one: with 32 streams and 8 plain
   requests in flight (tests/compose/faults.py), the container is killed (SIGKILL to its PID 1, as an
   OOM kill or crash would); requests arriving during the outage and a new request end promptly (503
   in OpenAI's error shape), /health says 503 naming the service; every request ends (completed or a
   clean error: none hangs, none is dropped silently), reported per outcome;
3. the restart policy brings the service back within 45 s of the kill (--heal-timeout) and the gateway
   (never restarted) answers again, with the same greedy answer;
4. drain: SIGTERM to the gateway with 16 streams of 1000 tokens in flight: all 16 complete (a finish
   reason and [DONE]) within the drain (DRAIN_TIMEOUT, 30 s), a new request during the drain is refused
   at once (connection refused or 503, never a hang), the gateway exits 0 and its restart policy brings
   it back.

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
import time

import httpx
import openai
from faults import (  # tests/compose/faults.py, beside this script
    PLAIN,
    STREAMS,
    HealWatch,
    Load,
    chat_body,
    report,
)
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
    p.add_argument("--recover-timeout", type=float, default=240)  # how long to wait for a diagnosis
    # what passes: serving again within this (the LLM service compiles its decode step at start-up: ~7 s of
    # the ~26 s an LLM restart under load took here, with the compile cache from its first start)
    p.add_argument("--heal-timeout", type=float, default=45)
    p.add_argument("--drain-timeout", type=float, default=30)  # the services' DRAIN_TIMEOUT
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
    # structured output: the LLM container loads the tokenizer and compiles the schema (llguidance)
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "maximum": 9},
        },
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    structured = chat(client, model, image, max_tokens=40, response_format=response_format)
    value = json.loads(structured.choices[0].message.content)
    assert set(value) == {"colour", "count"} and value["colour"] in ("red", "green", "blue"), value
    log(f"structured output with an image: {value}")
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200, health.text
    log("chat with an image OK (deterministic, stream == non-stream, JSON schema), /health 200")
    return text


# Tokens per request: the llm kill cuts long generations; under the vision kill the requests already
# past the encoder run to the end, so they are short (the check stays about a minute in all).
MAX_TOKENS = {"llm": 1000, "vision": 96}
HANG_AFTER_S = 60  # a request not ended this long after the kill hangs


def kill_under_load(
    args: argparse.Namespace, base: str, model: str, service: str
) -> tuple[Load, dict, float]:
    """Step 2, first half: 32 streams + 8 plain requests in flight, then SIGKILL `service`'s container
    and send a few more (arrivals during the outage). Returns the load, the container as it was before
    the kill, and the kill's time."""
    before = container(args.engine, args.project, service)
    headers = {"Authorization": f"Bearer {os.environ.get('API_KEY') or 'unused'}"}
    load = Load(base, headers, model, MAX_TOKENS[service])
    load.start(STREAMS, PLAIN, seed=1000 if service == "llm" else 2000)
    if service == "llm":  # every stream decoding
        log(f"{load.wait_streaming(60)}/{STREAMS} streams decoding")
    else:  # images still being encoded
        time.sleep(0.5)
    pid = before["State"]["Pid"]
    log(f"killing the {service} container ({before['Name']}, PID 1 = host pid {pid}) with SIGKILL")
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    load.start(2, 2, seed=3000 if service == "llm" else 4000)
    return load, before, t_kill


def check_load_ended(load: Load, service: str, t_kill: float) -> None:
    """Step 2, last part: every request ended, completed or with a clean error."""
    outcomes = load.finish(t_kill + HANG_AFTER_S)
    log(
        report(
            f"{service} killed under load ({STREAMS} streams + {PLAIN} plain, then 2 + 2 arrivals)", outcomes
        )
    )
    kinds = {outcome.kind for outcome in outcomes}
    assert "hang" not in kinds, f"requests hang after the {service} container died"
    assert "dropped" not in kinds, f"requests were dropped without a clean error after the {service} kill"


def check_down(client: openai.OpenAI, base: str, model: str, image: str, service: str) -> None:
    """Step 2, second half: a new request while `service` is down ends promptly with 503; /health names
    the service."""
    t = time.monotonic()
    try:
        chat(client, model, image, max_tokens=8)
        raise AssertionError(f"a request succeeded while {service} was down")
    except openai.APIStatusError as exc:
        took = time.monotonic() - t
        log(f"new request while {service} is down: HTTP {exc.status_code} in {took:.2f}s: {exc.body}")
        assert exc.status_code == 503, exc
        assert isinstance(exc.body, dict) and f"{service} service is unavailable" in exc.body.get(
            "message", ""
        )
        assert took < 10, f"503 took {took:.1f}s"
    health = httpx.get(base + "/health", timeout=10)
    log(f"/health while {service} is down: {health.status_code} {health.text}")
    assert health.status_code == 503 and service in health.json()["backends"], health.text


def check_recovery(
    args: argparse.Namespace,
    client: openai.OpenAI,
    base: str,
    model: str,
    image: str,
    text: str,
    service: str,
    before: dict,
    t_kill: float,
    heal: HealWatch,
) -> None:
    """Step 3: the restart policy brings `service` back; the gateway (never restarted) answers again."""
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
    after = container(args.engine, args.project, service)
    log(
        f"recovered {recovered:.1f}s after the kill ({attempts} tries); {service} restarts: "
        f"{before.get('RestartCount', 0)} -> {after.get('RestartCount', 0)}, state {after['State']['Status']}"
    )
    assert back.choices[0].message.content == text, (back.choices[0].message.content, text)
    assert after["State"]["Pid"] != before["State"]["Pid"]
    gw = container(args.engine, args.project, "gateway")
    assert gw["State"]["Status"] == "running" and gw.get("RestartCount", 0) == 0, "gateway restarted"
    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200, health.text
    healed = heal.wait()
    took = "never" if healed is None else f"{healed:.1f}s after the kill"
    log(f"{service}: /health 200 again: {took} (limit {args.heal_timeout:.0f}s)")
    assert healed is not None and healed <= args.heal_timeout, f"{service} did not heal in time"
    log(f"{service} restarted by the restart policy, same greedy answer, /health 200")


DRAIN_STREAMS, DRAIN_TOKENS = 16, 1000


def refused_during_drain(base: str, model: str) -> str:
    """A new request sent while the gateway drains: how it ended ("refused ..." is what passes)."""
    try:
        response = httpx.post(base + "/v1/chat/completions", json=chat_body(model, 6000, 8), timeout=15)
    except httpx.TimeoutException:
        return "hang"
    except httpx.TransportError as exc:  # the listener is closed: refused, or reset by the port forwarder
        return f"refused ({type(exc).__name__})"
    return "refused (503)" if response.status_code == 503 else f"answered HTTP {response.status_code}"


def drain_gateway_under_load(args: argparse.Namespace, base: str, model: str) -> None:
    """Step 4: SIGTERM to the gateway's PID 1 (tini, which forwards it) with 16 long streams in flight."""
    before = container(args.engine, args.project, "gateway")
    headers = {"Authorization": f"Bearer {os.environ.get('API_KEY') or 'unused'}"}
    load = Load(base, headers, model, DRAIN_TOKENS)
    load.start(DRAIN_STREAMS, 0, seed=5000)
    log(f"{load.wait_streaming(120)}/{DRAIN_STREAMS} streams of {DRAIN_TOKENS} tokens decoding")
    t_term = time.monotonic()
    os.kill(before["State"]["Pid"], signal.SIGTERM)
    time.sleep(1.0)  # the gateway has stopped accepting
    refused = refused_during_drain(base, model)
    log(f"a new request during the drain: {refused}")
    outcomes = load.finish(t_term + args.drain_timeout + 15)
    took = time.monotonic() - t_term
    log(
        report(
            f"gateway SIGTERM with {DRAIN_STREAMS} streams in flight (ended {took:.1f}s after it)", outcomes
        )
    )
    completed = sum(outcome.kind == "completed" for outcome in outcomes)
    assert completed == DRAIN_STREAMS, f"{completed}/{DRAIN_STREAMS} streams completed during the drain"
    assert took <= args.drain_timeout + 2, f"the streams took {took:.1f}s, past the drain"
    assert refused.startswith("refused"), refused
    healed = HealWatch(base, t_term, args.recover_timeout).wait()
    assert healed is not None, "the gateway did not come back after its drain"
    after = container(args.engine, args.project, "gateway")
    log(
        f"gateway back (restart policy, {after.get('RestartCount', 0)} restarts): /health 200 {healed:.1f}s after SIGTERM"
    )


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
    for service in ("llm", "vision"):
        load, before, t_kill = kill_under_load(args, base, model, service)
        check_down(client, base, model, image, service)
        heal = HealWatch(base, t_kill, args.recover_timeout)  # from now on, beside the load ending
        check_load_ended(load, service, t_kill)
        check_recovery(args, client, base, model, image, text, service, before, t_kill, heal)
    drain_gateway_under_load(args, base, model)
    return 0


T0 = time.monotonic()

if __name__ == "__main__":
    sys.exit(main())
