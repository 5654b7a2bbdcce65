"""A flood leaves the engine healthy: 64 concurrent streams, half of them abandoned after their first
chunk, then long generations (900 tokens, ignore_eos) over HTTP and over gRPC must succeed.

This sequence broke the service before: decode staging compacted its rows after the flood, and the
next step that needed more columns than allocated copied the old rows into a smaller buffer, failing
every later long generation until a restart (tests/unit/test_decode_staging_random.py has the unit
form). Tokens are not compared here: the stack's answers are checked against transformers elsewhere."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from mmserve.grpc_util import channel_options
from mmserve.proto import llm_pb2_grpc
from mmserve.wire import GenerateRequest, SamplingParams
from mmserve.wire_pb import generate_output_from_pb, generate_request_to_pb
from tests.helpers import serving

FLOOD = 64
LONG = 900


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, image_dir, tmp_path_factory):
    with serving(tiny_checkpoint, image_dir, tmp_path_factory.mktemp("logs")) as (stack, _):
        yield stack


def body(text: str, max_tokens: int, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def flood(base_url: str) -> list[str]:
    """FLOOD streams at once; the odd ones hang up after their first chunk. Returns each outcome."""

    async def one(client: httpx.AsyncClient, i: int) -> str:
        payload = body(f"Describe picture number {i} in detail.", 64 + 5 * i, stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            if response.status_code != 200:
                return f"status {response.status_code}"
            async for line in response.aiter_lines():
                if i % 2 and line.startswith("data: {"):
                    return "abandoned"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "done"
        return "cut"

    limits = httpx.Limits(max_connections=FLOOD)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(FLOOD)))


def test_long_generations_after_a_flood_over_http_and_grpc(stack):
    outcomes = asyncio.run(flood(stack.base_url))
    assert outcomes.count("done") == FLOOD // 2 and outcomes.count("abandoned") == FLOOD // 2, outcomes

    # HTTP, streamed and not
    reply = httpx.post(
        stack.base_url + "/v1/chat/completions", json=body("Tell a long story.", LONG), timeout=300
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == LONG
    events = []
    with httpx.stream(
        "POST",
        stack.base_url + "/v1/chat/completions",
        json=body("Tell another long story.", LONG, stream=True, stream_options={"include_usage": True}),
        timeout=300,
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == LONG

    # gRPC, straight to the LLM service
    async def generate() -> list[int]:
        request = GenerateRequest(
            "flood-grpc",
            [1, 40, 41, 42, 43],
            [],
            SamplingParams(temperature=0.0, max_new_tokens=LONG, ignore_eos=True),
        )
        ids: list[int] = []
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{stack.llm_port}", options=channel_options(64 << 20)
        ) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            async for message in stub.Generate(generate_request_to_pb(request), timeout=300):
                ids += generate_output_from_pb(message).token_ids
        return ids

    assert len(asyncio.run(generate())) == LONG
    assert httpx.get(stack.base_url + "/health", timeout=10).status_code == 200
