"""When the engine's step raises (a bug, an OOM, a CUDA error): a real LLMService server on loopback
whose model runner is made to fail on demand, a real client, and the service's gRPC health watched
the way `serve` watches it.

- A failed step fails the requests of its batch with UNAVAILABLE naming the error (never INTERNAL);
  the engine goes on, and its health stays SERVING.
- A success resets the count; three failed steps in a row, or one fatal (CUDA) error, stop the engine:
  health turns NOT_SERVING, later requests get UNAVAILABLE with the reason; a restart serves again.
- A request whose own logits turn NaN ends with INVALID_ARGUMENT; the other requests of its batch
  get exactly the tokens of a clean run.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from llm_service.server import LLMServicer
from mmserve import grpc_util
from mmserve.proto import llm_pb2, llm_pb2_grpc
from mmserve.wire import GenerateRequest, SamplingParams
from mmserve.wire_pb import generate_request_to_pb
from tests.service.watched import assert_unavailable, health_status, serve_watched, wait_for_status

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SMALL_CACHE = 16 << 20  # zeroing the 2 GiB default would take longer than the test


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))


@pytest.fixture
def engine(model):
    engine = Engine(model, kv_cache_bytes=SMALL_CACHE)
    yield engine
    engine.stop()


class FailingSteps:
    """The runner's execute, except that the next `remaining` steps raise `error`."""

    def __init__(self, engine: Engine, error: Exception):
        self.execute = engine.runner.execute
        self.error = error
        self.remaining = 0

    def __call__(self, plan):
        if self.remaining > 0:
            self.remaining -= 1
            raise self.error
        return self.execute(plan)


def failing(engine: Engine, monkeypatch, error: Exception) -> FailingSteps:
    steps = FailingSteps(engine, error)
    monkeypatch.setattr(engine.runner, "execute", steps)
    return steps


def serve(engine: Engine, body):
    """`body(stub, channel)` against a server whose health follows `engine.is_alive` as in `serve`."""

    def add(server):
        llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(engine), server)

    return serve_watched(add, SERVICE, engine.is_alive, lambda ch: body(llm_pb2_grpc.LLMServiceStub(ch), ch))


def request(request_id: str = "r", ids=(1, 40, 41, 42), tokens: int = 5):
    params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    return generate_request_to_pb(GenerateRequest(request_id, list(ids), [], params))


async def outcome(stub, pb) -> list[int] | grpc.aio.AioRpcError:
    """The request's tokens, or the error that ended it."""
    try:
        return [t async for m in stub.Generate(pb) for t in m.token_ids]
    except grpc.aio.AioRpcError as exc:
        return exc


async def status(channel) -> int:
    return await health_status(channel, SERVICE)


def test_a_failed_step_fails_its_batch_cleanly_and_the_engine_keeps_serving(engine, monkeypatch):
    steps = failing(engine, monkeypatch, RuntimeError("boom"))

    async def body(stub, channel):
        steps.remaining = 1
        failed = await outcome(stub, request())
        return failed, await status(channel), await outcome(stub, request())

    failed, health_after, next_tokens = serve(engine, body)
    assert_unavailable(failed, "engine step", "RuntimeError: boom")
    assert health_after == SERVING and engine.is_alive()
    assert isinstance(next_tokens, list) and len(next_tokens) == 5
    until = time.monotonic() + 5  # the worker frees the last request's blocks just after its last token
    while engine.num_free_blocks() != engine.block_manager.num_blocks and time.monotonic() < until:
        time.sleep(0.01)
    assert engine.num_free_blocks() == engine.block_manager.num_blocks  # the failed batch freed its KV


def test_a_success_resets_the_count_of_failed_steps(engine, monkeypatch):
    steps = failing(engine, monkeypatch, RuntimeError("flaky"))

    async def body(stub, channel):
        results = []
        for _ in range(2):  # two failures, a success: twice
            steps.remaining = 2
            results += [await outcome(stub, request()) for _ in range(3)]
        return results, await status(channel)

    results, health_after = serve(engine, body)
    for failed in results[0:2] + results[3:5]:
        assert_unavailable(failed, "RuntimeError: flaky")
    assert isinstance(results[2], list) and isinstance(results[5], list)
    assert health_after == SERVING and engine.is_alive()


def test_failed_steps_in_a_row_stop_the_engine_and_health_turns_not_serving(model, engine, monkeypatch):
    steps = failing(engine, monkeypatch, RuntimeError("stuck"))

    async def body(stub, channel):
        assert await status(channel) == SERVING
        steps.remaining = 3
        failed = [await outcome(stub, request()) for _ in range(3)]
        return failed, await wait_for_status(channel, SERVICE, NOT_SERVING), await outcome(stub, request())

    failed, health_after, refused = serve(engine, body)
    for result in failed:
        assert_unavailable(result, "RuntimeError: stuck")
    assert health_after == NOT_SERVING and not engine.is_alive()
    assert_unavailable(
        refused, "needs a restart", "3 consecutive engine step failures", "RuntimeError: stuck"
    )
    restarted = Engine(model, kv_cache_bytes=SMALL_CACHE)  # a restart heals it
    try:
        served = serve(restarted, lambda stub, channel: outcome(stub, request()))
        assert isinstance(served, list) and len(served) == 5 and restarted.is_alive()
    finally:
        restarted.stop()


def test_a_cuda_error_stops_the_engine_at_once(engine, monkeypatch):
    steps = failing(engine, monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))

    async def body(stub, channel):
        steps.remaining = 1
        failed = await outcome(stub, request())
        return failed, await wait_for_status(channel, SERVICE, NOT_SERVING), await outcome(stub, request())

    failed, health_after, refused = serve(engine, body)
    assert_unavailable(failed, "CUDA error")
    assert health_after == NOT_SERVING
    assert_unavailable(refused, "needs a restart", "fatal engine step failure")


def test_nan_logits_end_their_own_request_only(engine, monkeypatch):
    execute = engine.runner.execute

    def poisoning(plan):
        """The real step, with the logits of the request "poisoned" set to NaN from its 3rd token on."""
        sampling, logits = execute(plan)
        logits = logits.clone()  # an inference tensor: not writable outside inference mode
        for row, item in enumerate(sampling):
            if item.seq.request.request_id == "poisoned" and len(item.seq.output_token_ids) >= 2:
                logits[row] = torch.nan
        return sampling, logits

    async def body(stub, channel):
        clean = await outcome(stub, request("clean", tokens=12))
        monkeypatch.setattr(engine.runner, "execute", poisoning)
        together = await asyncio.gather(
            outcome(stub, request("poisoned", ids=(1, 50, 51), tokens=12)),
            outcome(stub, request("clean", tokens=12)),
        )
        return clean, together, await status(channel)

    clean, (poisoned, beside), health_after = serve(engine, body)
    assert isinstance(poisoned, grpc.aio.AioRpcError)
    assert poisoned.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN/Inf at output token 2" in poisoned.details()
    assert beside == clean  # the request beside it is untouched
    assert health_after == SERVING and engine.is_alive()


def test_a_service_that_is_no_longer_live_reports_not_serving_then_stops(monkeypatch):
    """serve() returns True (its caller exits non-zero, for a restart policy to act) after the failed
    service has answered NOT_SERVING for DEAD_EXIT_DELAY_S; a signal-free, model-free server."""
    monkeypatch.setattr(grpc_util, "DEAD_EXIT_DELAY_S", 0.5)
    alive = [True]
    seen = []

    async def go():
        server = asyncio.create_task(
            grpc_util.serve(
                lambda server: None, SERVICE, "127.0.0.1", 0, 1 << 20, 1.0, liveness=lambda: alive[0]
            )
        )
        await asyncio.sleep(0.5)
        assert not server.done()  # live: it serves on
        alive[0] = False
        died = await asyncio.wait_for(server, timeout=30)
        seen.append(died)

    asyncio.run(go())
    assert seen == [True]
