"""Replica routing benchmark (issue: replicas with cache-aware routing): does a second LLM replica keep
the prefix-cache hits one replica gets?

Workload: the anchor checkpoint (LLaVA-1.5-shaped, 576 image tokens), 32 chat requests over 4 distinct
336x336 images (8 each, each with its own question), in a fixed shuffled order, at most 8 in flight,
16 greedy output tokens each, through the gateway with the official `openai` client. Run three times,
each on a fresh stack (empty caches): one LLM replica; two replicas with the gateway's cache_aware
routing; two with round_robin, for contrast. Reported per run: the prefix-cache hit rate (cached prompt
tokens / prompt tokens, from each response's usage), the requests each replica served (its
mmserve_llm_requests_total), TTFT p50 and the wall time. The LLM processes share the machine's cores
(--threads cores/replicas each), so the times say little on a 2-core machine; the hit rate is the
point.

`--compose` runs each stack as docker-compose.yml, for real (the podman kit of `make compose-test`,
or Docker): `LLM_REPLICAS` containers of `llm` behind one gateway container, the anchor bind-mounted as
MODEL_DIR; "served" is then read from each llm container's own metrics.

    python -m benchmarks.bench_routing [--requests 32] [--images 4] [--concurrency 8] [--compose]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import openai

from benchmarks.bench_vision import anchor_checkpoint, photo_like
from tests.compose.scale_check import exported, wait_for_replicas
from tests.helpers import Stack, data_url, free_ports, metric

RESULTS = Path(__file__).parent / "results"
MODES = (("1 replica", 1, "cache_aware"), ("2 replicas, cache_aware", 2, "cache_aware"))
CONTRAST = ("2 replicas, round_robin", 2, "round_robin")
COMPOSE_PROJECT = "mmserve-bench"


async def one(api, image: bytes, text: str, max_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image, "image/jpeg")}}]
    content.append({"type": "text", "text": text})
    sent = time.perf_counter()
    first = None
    usage = None
    stream = await api.chat.completions.create(
        model="anchor",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    async for chunk in stream:
        # the first chunk carrying tokens (their text may be held back: random weights, odd bytes)
        if first is None and chunk.choices and getattr(chunk.choices[0], "token_ids", None):
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and first is not None, "a response without usage or tokens"
    return {
        "ttft": first - sent,
        "prompt": usage.prompt_tokens,
        "cached": usage.prompt_tokens_details.cached_tokens,
    }


async def send(base_url: str, work: list[tuple[bytes, str]], concurrency: int, max_tokens: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)

    async def limited(image: bytes, text: str) -> dict:
        async with gate:
            return await one(api, image, text, max_tokens)

    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0, timeout=600) as api:
        return await asyncio.gather(*(limited(image, text) for image, text in work))


def run_mode(name: str, replicas: int, policy: str, work, args) -> dict:
    threads = str(max(1, (os.cpu_count() or 1) // replicas))
    gateway_args = ["--model-name", "anchor", "--llm-routing", policy]
    with tempfile.TemporaryDirectory() as logs:
        stack = Stack(
            anchor_checkpoint(),
            Path(logs),
            gateway_args,
            ["--threads", threads],
            dtype="bfloat16",
            llm_replicas=replicas,
        ).start(timeout_s=600)
        try:
            started = time.perf_counter()
            results = asyncio.run(send(stack.base_url, work, args.concurrency, args.max_tokens))
            wall = time.perf_counter() - started
            served = [
                sum(metric(p, f'mmserve_llm_requests_total{{reason="{r}"}}', 0.0) for r in ("length", "stop"))
                for p in stack.llm_metrics_ports
            ]
        finally:
            stack.stop()
    return summary(name, replicas, policy, results, served, wall)


def run_mode_compose(name: str, replicas: int, policy: str, work, args, models: Path) -> dict:
    """One mode on docker-compose.yml: `compose up` with the mode's variables, the workload through the
    published gateway port, each llm container's request counter, `compose down -v`."""
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "PORT": str(port),
        "MODEL_DIR": str(models),
        "CHECKPOINT_PATH": "/models/anchor",
        "MODEL_NAME": "anchor",
        "LLM_REPLICAS": str(replicas),
        "LLM_ROUTING": policy,
        "LLM_THREADS": str(max(1, (os.cpu_count() or 1) // replicas)),
    }
    compose = [*args.compose_command.split(), "-p", COMPOSE_PROJECT]
    try:
        subprocess.run([*compose, "up", "-d"], env=env, check=True, capture_output=True)
        wait_for_replicas(f"http://127.0.0.1:{port}", timeout_s=600, llm=replicas, vision=1)
        started = time.perf_counter()
        results = asyncio.run(send(f"http://127.0.0.1:{port}", work, args.concurrency, args.max_tokens))
        wall = time.perf_counter() - started
        served = [
            exported(args.engine, f"{COMPOSE_PROJECT}_llm_{i}", "mmserve_llm_requests_total", 9090)
            for i in range(1, replicas + 1)
        ]
    finally:
        subprocess.run([*compose, "down", "-v", "-t", "1"], env=env, capture_output=True)
        leftover = subprocess.run(
            [args.engine, "ps", "-aq", "--filter", f"label=io.podman.compose.project={COMPOSE_PROJECT}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if leftover:  # podman-compose's down removes <service>_1 only
            subprocess.run([args.engine, "rm", "-f", "-t", "1", *leftover], capture_output=True)
    return summary(name, replicas, policy, results, served, wall)


def summary(
    name: str, replicas: int, policy: str, results: list[dict], served: list[float], wall: float
) -> dict:
    prompt = sum(r["prompt"] for r in results)
    cached = sum(r["cached"] for r in results)
    return {
        "mode": name,
        "replicas": replicas,
        "policy": policy,
        "hit_rate": cached / prompt,
        "cached_tokens": cached,
        "prompt_tokens": prompt,
        "served_per_replica": [int(s) for s in served],
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compose", action="store_true", help="each stack as docker-compose.yml, for real")
    parser.add_argument(
        "--compose-command", default="compose", help="`compose` (the podman kit) or `docker compose`"
    )
    parser.add_argument("--engine", default="podman", help="the container CLI, to read each llm's metrics")
    args = parser.parse_args(argv)
    images = [photo_like(900 + i) for i in range(args.images)]
    work = [(images[i % args.images], f"Question {i}: what do you see here?") for i in range(args.requests)]
    random.Random(args.seed).shuffle(work)  # a fixed order no policy can line up with by chance
    runs = []
    with tempfile.TemporaryDirectory() as models:
        if args.compose:
            # the containers' user (uid 1000) reads the anchor: a world-readable copy, and one image build
            shutil.copytree(anchor_checkpoint(), Path(models) / "anchor")
            for path in [Path(models), *Path(models).rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            compose = [*args.compose_command.split(), "-p", COMPOSE_PROJECT, "build"]
            subprocess.run(compose, check=True, capture_output=True)
        for name, replicas, policy in (*MODES, CONTRAST):
            print(f"--- {name}{' (compose)' if args.compose else ''} ...", flush=True)
            if args.compose:
                runs.append(run_mode_compose(name, replicas, policy, work, args, Path(models)))
            else:
                runs.append(run_mode(name, replicas, policy, work, args))
            print(json.dumps(runs[-1]), flush=True)
    where = "docker-compose.yml" if args.compose else "supervised processes"
    print(
        f"\n{args.requests} requests over {args.images} images, {args.concurrency} in flight, cold caches, {where}:"
    )
    print(f"{'mode':<26} {'hit rate':>9} {'served per replica':>20} {'TTFT p50':>9} {'wall':>7}")
    for r in runs:
        served = "/".join(map(str, r["served_per_replica"]))
        print(
            f"{r['mode']:<26} {r['hit_rate']:>9.3f} {served:>20} {r['ttft_p50_s']:>8.2f}s {r['wall_s']:>6.1f}s"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"routing{'-compose' if args.compose else ''}-{date.today()}.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
