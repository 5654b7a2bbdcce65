"""One gateway over two LLM replicas (real processes): prompts that share their beginning reach the
replica whose prefix cache holds it, both replicas serve, and when one is killed under load every
request in flight ends (served, or with a clean error) and new requests go to the other."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import pytest

from tests.helpers import Stack, data_url, exported_value, make_image, metric

IMAGES = [make_image(48 + i, 40, seed=500 + i) for i in range(16)]  # all 16 on one replica: 2 in 65536


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    # no imbalance fallback here: the consistent hashing alone is under test (the fallback: unit tests)
    args = ["--llm-routing-max-imbalance", "1000"]
    stack = Stack(tiny_checkpoint, tmp_path_factory.mktemp("logs"), args, llm_replicas=2).start()
    yield stack
    stack.stop()


def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def ask(api: openai.AsyncOpenAI, image: bytes, text: str, max_tokens: int, started=None) -> str:
    """One streamed chat request; "done" with its cached prompt tokens, or the error it ended with."""
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]
    try:
        stream = await api.chat.completions.create(
            model="tiny-llava",
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        cached = -1
        async for chunk in stream:
            if started is not None and chunk.choices and chunk.choices[0].delta.content:
                started.set()
            if chunk.usage is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        return f"done cached={cached}"
    except openai.APIError as exc:
        return f"error {type(exc).__name__}: {exc}"


def test_prompts_sharing_an_image_reach_the_replica_that_cached_it(stack):
    async def rounds():
        async with client(stack) as api:
            first = await asyncio.gather(*(ask(api, image, "What is this?", 4) for image in IMAGES))
            second = await asyncio.gather(*(ask(api, image, "Describe it again.", 4) for image in IMAGES))
            return first, second

    first, second = asyncio.run(rounds())
    assert all(r.startswith("done") for r in first + second), first + second
    finished = 'mmserve_llm_requests_total{reason="length"}'
    served = [metric(port, finished, 0.0) for port in stack.llm_metrics_ports]
    assert all(served) and sum(served) >= 2 * len(IMAGES), served  # both replicas served
    # every second request met its image's KV on the replica the first one built it on
    assert all(int(r.split("cached=")[1]) > 0 for r in second), second


def test_killing_one_replica_under_load_ends_every_request_and_the_other_serves(stack):
    dead = stack.procs["llm-2"]

    async def load():
        async with client(stack) as api:
            started = [asyncio.Event() for _ in IMAGES]
            running = [
                asyncio.create_task(ask(api, image, f"Story {i}.", 600, started[i]))
                for i, image in enumerate(IMAGES)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[:8])), 60)
            os.kill(dead.pid, signal.SIGKILL)
            ended = await asyncio.wait_for(asyncio.gather(*running), 120)  # none may hang
            after = await asyncio.gather(*(ask(api, image, "And now?", 4) for image in IMAGES))
            return ended, after

    ended, after = asyncio.run(load())
    dead.wait()
    assert all(r.startswith(("done", "error APIError")) for r in ended), ended
    assert any(r.startswith("done") for r in ended) and any(r.startswith("error") for r in ended), ended
    # every new request was served, those whose image hashed to the dead replica too
    assert all(r.startswith("done") for r in after), after
    health = httpx.get(stack.base_url + "/health", timeout=10)
    assert health.status_code == 200, health.text
    states = health.json()["backends"]["llm"]
    assert sorted(state == "SERVING" for state in states.values()) == [False, True], states
    gateway = httpx.get(stack.base_url + "/metrics", timeout=10).text
    dead_name = f"127.0.0.1:{stack.llm_ports[1]}"
    up = f'mmserve_gateway_backend_up{{service="llm",backend="{dead_name}"}}'
    assert exported_value(gateway, up) == 0.0
