"""The hardening limits over real HTTP on the three-process stack: the services require the internal
secret, which the supervisor hands to all three (chat with an image is served end to end; a direct gRPC
call without it is refused; health needs none; no log shows it); the gateway's cap on requests in flight
answers 429 + Retry-After; a stream over the request time limit ends with an error event + [DONE] and its
sequence leaves the LLM's running batch."""

from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.proto import llm_pb2, llm_pb2_grpc
from tests.helpers import greedy_chat, serving

SECRET = "e2e-internal-secret-6f1c"
TIMEOUT_S = 5
LONG = {
    "messages": [{"role": "user", "content": "Tell a long story."}],
    "max_tokens": 3000,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


@pytest.fixture(scope="module")
def served(tiny_checkpoint, image_dir, tmp_path_factory):
    args = ["--max-pending-requests", "1", "--request-timeout", str(TIMEOUT_S)]
    logs = tmp_path_factory.mktemp("logs")
    with serving(tiny_checkpoint, image_dir, logs, extra_args=args, internal_token=SECRET) as stack_and_base:
        yield stack_and_base


def test_a_stack_with_the_internal_secret_serves_chat_with_an_image(served, client):
    stack, base = served
    answer = greedy_chat(client, "What is in the image?", [f"{base}/a.png"], max_tokens=8)
    assert answer.choices[0].finish_reason == "length" and len(answer.choices[0].token_ids) == 8
    with grpc.insecure_channel(f"127.0.0.1:{stack.llm_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            llm_pb2_grpc.LLMServiceStub(channel).GetModelInfo(llm_pb2.LLMModelInfoRequest(), timeout=10)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing internal token" in refused.value.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    logs = stack.logs()
    assert "internal token on" in logs and SECRET not in logs


def long_stream(base_url: str, started: threading.Event, out: dict) -> None:
    events = []
    began = time.monotonic()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=LONG, timeout=120) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                started.set()
    out["events"], out["seconds"] = events, time.monotonic() - began


def test_over_the_cap_429_then_the_time_limit_ends_the_stream(served):
    stack, _ = served
    started, result = threading.Event(), {}
    thread = threading.Thread(target=long_stream, args=(stack.base_url, started, result))
    thread.start()
    assert started.wait(60), "the long stream never started"
    refused = httpx.post(
        stack.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=10
    )
    thread.join(60)
    assert not thread.is_alive(), "the stream outlived its time limit"

    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "MAX_PENDING_REQUESTS" in error["message"]

    events = result["events"]
    assert result["status"] == 200 and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["error"]["type"] == "timeout" and f"time limit of {TIMEOUT_S} s" in last["error"]["message"]
    assert result["seconds"] < TIMEOUT_S + 10
    deadline = time.monotonic() + 10  # the cancelled sequence leaves the running batch, its KV freed
    while stack.llm_metric("mmserve_llm_running_requests") != 0:
        assert time.monotonic() < deadline, "the timed-out sequence is still running in the LLM service"
        time.sleep(0.2)
    again = httpx.post(stack.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
    assert again.status_code == 200, again.text  # the slot came back
