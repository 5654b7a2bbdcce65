"""The engine benchmark's mmserve side: the three-process stack, and the requests sent to it through
the gateway with the official `openai` client, streaming, every token timestamped."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx

from benchmarks.engine_measure import WARMUP_SEED, RequestTiming, RunResult, Workload
from tests.helpers import Stack, data_url

MODEL_NAME = "anchor"


def bench_stack(checkpoint: Path, log_dir: Path, dtype: str, llm_args: list[str]) -> Stack:
    """tests.helpers.Stack with the benchmark's dtype on both services, all cores for the LLM, and the
    extra LLM flags given last (so they override the ones here)."""
    threads = ["--threads", str(os.cpu_count() or 1)]
    return Stack(checkpoint, log_dir, ["--model-name", MODEL_NAME], [*threads, *llm_args], dtype=dtype)


async def one_request(client, image: bytes, text: str, max_tokens: int) -> RequestTiming:
    timing = RequestTiming(sent=time.perf_counter())
    try:
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(image, "image/jpeg")}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                timing.completion_tokens = chunk.usage.completion_tokens
                timing.prompt_tokens = chunk.usage.prompt_tokens
            for choice in chunk.choices:
                # Each chunk names the token ids it carries (vLLM's return_token_ids), so a chunk
                # with several tokens counts as several; the role-only head chunk carries none.
                ids = getattr(choice, "token_ids", None) or []
                if not ids and choice.delta.content:
                    ids = [-1]  # the server did not echo ids: count a content chunk as one token
                timing.token_ids.extend(ids)
                timing.token_times.extend([now] * len(ids))
        timing.finished = time.perf_counter()
        if not timing.token_times:
            timing.error = "no token came back"
    except Exception as exc:  # reported per request, the run goes on
        timing.finished = time.perf_counter()
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


async def mmserve_runs(
    base_url: str, work: Workload, single: Workload, max_tokens: int
) -> tuple[RunResult, RunResult]:
    import openai

    async with openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600
    ) as client:
        warm = Workload.make(2, WARMUP_SEED)
        for image, text in zip(warm.images, warm.texts, strict=True):
            warm_up = await one_request(client, image, text, 8)
            if warm_up.error:
                print(f"warm-up request failed: {warm_up.error}", flush=True)
        started = time.perf_counter()
        concurrent = await asyncio.gather(
            *(
                one_request(client, image, text, max_tokens)
                for image, text in zip(work.images, work.texts, strict=True)
            )
        )
        wall = max(r.finished for r in concurrent) - started
        together = RunResult(f"mmserve ({len(work.images)} at once)", list(concurrent), wall)
        alone = []
        for image, text in zip(single.images, single.texts, strict=True):
            alone.append(await one_request(client, image, text, max_tokens))
        one_by_one = RunResult("mmserve single stream", alone, sum(r.finished - r.sent for r in alone))
    return together, one_by_one


def llm_metric_lines(port: int) -> list[str]:
    """The LLM service's engine metrics about caching, preemption and KV use, where it exports any."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return []
    keys = ("prefix", "preempt", "kv", "cache", "block")
    return [
        line
        for line in text.splitlines()
        if line.startswith("mmserve_llm_")
        and not line.split("{")[0].split()[0].endswith("_created")  # prometheus_client's timestamps
        and any(k in line.split("{")[0].split()[0] for k in keys)
    ]
