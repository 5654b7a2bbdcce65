"""Checks against a compose stack started with `--scale llm=2 --scale vision=2` (driven by
tests/compose/run.sh, not by pytest).

0. waits until the gateway's /health lists two replicas of each service SERVING;
1. 12 chat requests, each with its own image, then the same 12 images again with new questions: both LLM
   replicas and both vision replicas serve (their own metrics, read inside each container), no image is
   encoded twice, and every second-round request finds its image's KV in the prefix cache of the replica
   that served the first (cached_tokens in its usage): the gateway's cache-aware routing;
2. SIGKILL to the second LLM replica with 8 streams in flight: every stream ends (completed, or a clean
   error) within 60 s, none hangs; 8 new requests over the same images all succeed (the other replica
   serves what the dead one owned), and /health stays 200.

Usage: python tests/compose/scale_check.py --port 8000 --project mmserve-test [--engine podman]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import subprocess
import sys
import time

import httpx
import openai
from PIL import Image

IMAGES = 12  # cache_aware places new keys where the fewest are held: 6 on each replica
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[scale-check {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def image_url(seed: int) -> str:
    img = Image.new("RGB", (40 + seed, 32), (seed * 20 % 256, 90, 200 - seed * 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def exported(engine: str, name: str, metric: str, port: int, label: str = "") -> float:
    """The sum of `metric`'s samples whose labels include `label` (e.g. `outcome="encoded"`; every
    sample also carries model_name and replica) on the /metrics page inside container `name`. No such
    sample at all fails (a renamed metric must not read as 0); a labelled series exported only from
    its first increment on is the caller's to expect."""
    code = (
        "import urllib.request as u; "
        f"page = u.urlopen('http://127.0.0.1:{port}/metrics').read().decode(); "
        f"rows = [l for l in page.splitlines() if l.split('{{')[0].split(' ')[0] == {metric!r}]; "
        "print(len(rows), "
        f"sum(float(l.split()[-1]) for l in rows if {label!r} in l.split('}}')[0]))"
    )
    out = subprocess.run(
        [engine, "exec", name, "python", "-c", code], check=True, capture_output=True, text=True
    )
    rows, total = out.stdout.split()
    assert int(rows) > 0, f"{name} exports no {metric} samples"
    return float(total)


class Progress:
    """A stream's first content chunk (an event) and the time of its latest one."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.last = 0.0


async def ask(
    api: openai.AsyncOpenAI, model: str, seed: int, text: str, max_tokens: int, progress=None
) -> str:
    """One streamed chat request -> "done cached=N" or the error it ended with."""
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}}, {"type": "text", "text": text}]
    try:
        stream = await api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        cached = -1
        async for chunk in stream:
            if progress is not None and chunk.choices and chunk.choices[0].delta.content:
                progress.started.set()
                progress.last = time.monotonic()
            if chunk.usage is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        return f"done cached={cached}"
    except openai.APIError as exc:
        return f"error {type(exc).__name__}: {exc}"


async def rounds(base: str, args: argparse.Namespace) -> None:
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120) as api:
        model = (await api.models.list()).data[0].id
        # 4 in flight: a replica never has LLM_ROUTING_MAX_IMBALANCE (8) more when a request is placed,
        # so every request goes where its image went first
        gate = asyncio.Semaphore(4)

        async def limited(seed: int, text: str) -> str:
            async with gate:
                return await ask(api, model, seed, text, 4)

        first = await asyncio.gather(*(limited(i, "What is this?") for i in range(IMAGES)))
        second = await asyncio.gather(*(limited(i, "And its colour?") for i in range(IMAGES)))
        assert all(r.startswith("done") for r in first + second), first + second
        llm = [
            exported(args.engine, f"{args.project}_llm_{r}", "mmserve_llm_requests_total", 9090)
            for r in (1, 2)
        ]
        vision = [
            exported(
                args.engine,
                f"{args.project}_vision_{r}",
                "mmserve_vision_images_total",
                9090,
                'outcome="encoded"',
            )
            for r in (1, 2)
        ]
        log(f"{2 * IMAGES} requests: llm replicas served {llm}, vision replicas encoded {vision}")
        assert all(llm) and sum(llm) >= 2 * IMAGES, f"an LLM replica got no requests: {llm}"
        assert all(vision), f"a vision replica got no images: {vision}"
        assert sum(vision) == IMAGES, f"{sum(vision)} encodes for {IMAGES} images: an image went to both"
        assert all(int(r.split("cached=")[1]) > 0 for r in second), f"prefix cache missed: {second}"
        log("every second-round request hit its replica's prefix cache")

        # 3000 tokens: every stream is still decoding when the replica dies. Those on the killed
        # replica must end (an error event) within 30 s; those on the other must still be streaming.
        progress = [Progress() for _ in range(8)]
        running = [
            asyncio.create_task(ask(api, model, 100 + i, f"A long story {i}.", 3000, progress[i]))
            for i in range(8)
        ]
        await asyncio.wait_for(asyncio.gather(*(p.started.wait() for p in progress)), 60)
        subprocess.run([args.engine, "kill", "--signal", "KILL", f"{args.project}_llm_2"], check=True)
        assert not any(t.done() for t in running), "a stream ended before the kill: nothing was under load"
        done, _ = await asyncio.wait(running, timeout=30)
        now = time.monotonic()
        ended = [t.result() for t in running if t in done]
        alive = [i for i, t in enumerate(running) if t not in done and now - progress[i].last < 5]
        hung = [i for i, t in enumerate(running) if t not in done and i not in alive]
        log(
            f"SIGKILL to llm_2 with 8 streams in flight: {len(ended)} ended within 30 s ({ended}), "
            f"{len(alive)} still streaming from llm_1, {len(hung)} silent"
        )
        assert not hung, f"streams {hung} neither ended nor streamed in the last 5 s"
        assert all(r.startswith(("done", "error APIError")) for r in ended), ended
        for task in running:
            task.cancel()  # the survivors' clients go away; the gateway aborts them on llm_1
        await asyncio.gather(*running, return_exceptions=True)
        after = await asyncio.gather(*(ask(api, model, i, "Once more?", 4) for i in range(8)))
        assert all(r.startswith("done") for r in after), after
        health = httpx.get(base + "/health", timeout=10)
        assert health.status_code == 200, health.text
        log(f"8 new requests all served; /health 200: {health.json()['backends']['llm']}")


def wait_for_replicas(base: str, timeout_s: float = 240, llm: int = 2, vision: int = 2) -> None:
    """Until the gateway sees `llm` LLM and `vision` vision replicas SERVING (/health is 200 from the first
    one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            backends = httpx.get(base + "/health", timeout=10).json().get("backends", {})
        except (httpx.HTTPError, ValueError):
            backends = {}
        serving = {s: list(backends.get(s, {}).values()).count("SERVING") for s in ("llm", "vision")}
        if serving == {"llm": llm, "vision": vision}:
            log(f"the gateway sees {llm} LLM and {vision} vision replicas serving: {backends}")
            return
        assert time.monotonic() < deadline, f"replicas serving after {timeout_s:.0f}s: {backends}"
        time.sleep(1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--engine", default="podman")
    args = p.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    wait_for_replicas(base)
    asyncio.run(rounds(base, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
