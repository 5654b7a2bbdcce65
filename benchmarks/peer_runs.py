"""The peer benchmark's workload, sent the same way to either server (mmserve's gateway or vLLM's
OpenAI server) with the official `openai` client, streaming, every token timestamped
(benchmarks.engine_mmserve.one_request)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx2

from benchmarks.engine_measure import SINGLE_SEED, WARMUP_SEED, RunResult, Workload, question
from benchmarks.engine_mmserve import one_request

PAIR_SEED = 3_000  # the repeated-image pairs' images: sent by no other run


@dataclass
class PeerWorkload:
    """`work`: the 32 requests (cold and warm runs); `single`: one at a time, images no other run
    sends; `pairs`: a new image, then the same image with another question."""

    work: Workload
    single: Workload
    pairs: Workload

    @classmethod
    def make(cls, requests: int, single: int, pairs: int) -> PeerWorkload:
        work = Workload.make(requests, 0)
        return cls(work, Workload.make(single, SINGLE_SEED), Workload.make(pairs, PAIR_SEED))


class _BodyFields(httpx2.AsyncBaseTransport):
    """Adds fields to every JSON request body: the same requests (engine_mmserve.one_request's) then
    carry a server's own extension where one server needs it."""

    def __init__(self, fields: dict | None):
        self.fields = fields
        self.inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self.fields and request.headers.get("content-type", "").startswith("application/json"):
            body = {**json.loads(await request.aread()), **self.fields}
            headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"]
            request = httpx2.Request(request.method, request.url, headers=headers, json=body)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def openai_client(base_url: str, body_fields: dict | None = None):
    import openai

    http = httpx2.AsyncClient(transport=_BodyFields(body_fields), timeout=600)
    return openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600, http_client=http
    )


async def warm_up(client) -> None:
    warm = Workload.make(2, WARMUP_SEED)
    for image, text in zip(warm.images, warm.texts, strict=True):
        timing = await one_request(client, image, text, 8)
        if timing.error:
            print(f"  warm-up request failed: {timing.error}", flush=True)


async def together(client, name: str, work: Workload, max_tokens: int) -> RunResult:
    started = time.perf_counter()
    timings = await asyncio.gather(
        *(
            one_request(client, image, text, max_tokens)
            for image, text in zip(work.images, work.texts, strict=True)
        )
    )
    return RunResult(name, list(timings), max(t.finished for t in timings) - started)


async def one_by_one(client, name: str, images: list[bytes], texts: list[str], max_tokens: int) -> RunResult:
    timings = [
        await one_request(client, image, text, max_tokens) for image, text in zip(images, texts, strict=True)
    ]
    return RunResult(name, timings, sum(t.finished - t.sent for t in timings))


async def cold_runs(base_url: str, load: PeerWorkload, max_tokens: int, body: dict) -> dict[str, RunResult]:
    """On a server with its caches off: all requests at once, then the single ones one at a time.
    `body`: fields added to every request's body."""
    async with openai_client(base_url, body) as client:
        await warm_up(client)
        cold = await together(client, "cold", load.work, max_tokens)
        single = await one_by_one(client, "single", load.single.images, load.single.texts, max_tokens)
    return {"cold": cold, "single": single}


async def cached_runs(base_url: str, load: PeerWorkload, max_tokens: int, body: dict) -> dict[str, RunResult]:
    """On a server with its caches on: the same requests twice at once (the second pass is "warm"),
    then pairs one at a time: a new image, and right after it the same image with a new question."""
    async with openai_client(base_url, body) as client:
        await warm_up(client)
        first = await together(client, "warm_first_pass", load.work, max_tokens)
        warm = await together(client, "warm", load.work, max_tokens)
        new, repeat = [], []
        for i, image in enumerate(load.pairs.images):
            new.append(await one_request(client, image, load.pairs.texts[i], max_tokens))
            repeat.append(await one_request(client, image, question(i + 100), max_tokens))
    return {
        "warm_first_pass": first,
        "warm": warm,
        "new_image": RunResult("new_image", new, sum(t.finished - t.sent for t in new)),
        "repeat_image": RunResult("repeat_image", repeat, sum(t.finished - t.sent for t in repeat)),
    }
