"""One real LLMService gRPC server (in this process, so the engine can be inspected) and a real client."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from llm_service.server import LLMServicer
from mmserve.grpc_util import channel_options, start_server
from mmserve.proto import llm_pb2, llm_pb2_grpc
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams
from mmserve.wire_pb import generate_request_to_pb

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine(load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))), max_waiting=4)
    yield engine
    engine.stop()


def with_server(engine, body, server_limit=64 << 20):
    """Run `body(stub, channel, address)` against a fresh server on a free port."""

    async def go():
        server, _, port = await start_server(
            lambda s: llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(engine), s),
            SERVICE,
            "127.0.0.1",
            0,
            server_limit,
        )
        try:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=channel_options(64 << 20)
            ) as channel:
                return await body(llm_pb2_grpc.LLMServiceStub(channel), channel, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    return asyncio.run(go())


def request(engine, ids=None, spans=(), **sampling):
    info = engine.info()
    ids = ids if ids is not None else [1, 40, 41, 42]
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 5, **sampling})
    return generate_request_to_pb(GenerateRequest("r", ids, list(spans), params)), info


def test_generate_streams_tokens_then_finish_and_usage(engine):
    async def body(stub, channel, address):
        req, _ = request(engine, max_new_tokens=6, ignore_eos=True)
        return [m async for m in stub.Generate(req)]

    messages = with_server(engine, body)
    assert sum(len(m.token_ids) for m in messages) == 6
    assert all(m.finish_reason == llm_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert (messages[-1].usage.prompt_tokens, messages[-1].usage.completion_tokens) == (4, 6)


def test_span_length_mismatch_is_invalid_argument(engine):
    image_id = engine.info().image_token_id
    hidden = engine.info().hidden_size
    cases = {
        "differs from its 3 embedding rows": (
            [1, image_id, image_id, 5],
            [ImageSpan(1, torch.zeros(3, hidden), "h", length=2)],
        ),
        "cover 0": ([1, image_id, 5], []),
        "other than the image placeholder": ([1, 7, 7, 5], [ImageSpan(1, torch.zeros(2, hidden), "h")]),
        "exceeds the 3 prompt tokens": ([1, image_id, image_id], [ImageSpan(2, torch.zeros(2, hidden), "h")]),
        f"is not [N, {hidden}]": ([1, image_id, 5], [ImageSpan(1, torch.zeros(1, hidden + 1), "h")]),
        "outside the vocabulary": ([1, 10**6], []),
        "max_new_tokens must be >= 1": ([1, 2], []),
    }

    async def body(stub, channel, address):
        out = {}
        for needle, (ids, spans) in cases.items():
            extra = {"max_new_tokens": 0} if "max_new_tokens" in needle else {}
            req, _ = request(engine, ids, spans, **extra)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Generate(req):
                    pass
            out[needle] = (info.value.code(), info.value.details())
        return out

    for needle, (code, details) in with_server(engine, body).items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (needle, details)
        assert needle in details


def test_cancelling_the_stream_aborts_the_sequence_and_the_engine_keeps_serving(engine):
    async def body(stub, channel, address):
        req, _ = request(engine, max_new_tokens=2000, ignore_eos=True)
        call = stub.Generate(req)
        got = 0
        async for m in call:
            got += len(m.token_ids)
            if got >= 3:
                break
        assert engine.num_running() == 1
        held = engine.block_manager.num_blocks - engine.num_free_blocks()
        call.cancel()
        for _ in range(100):
            if engine.num_running() == 0:
                break
            await asyncio.sleep(0.05)
        after_cancel = engine.num_running(), engine.num_free_blocks()
        follow_up, _ = request(engine, max_new_tokens=3, ignore_eos=True)
        tail = [m async for m in stub.Generate(follow_up)]
        return held, after_cancel, tail

    held, (running, free), tail = with_server(engine, body)
    assert held > 0
    assert running == 0  # the cancelled sequence is gone, and every KV block it held is free again
    assert free == engine.block_manager.num_blocks
    assert engine.metrics.registry.get_sample_value("mmserve_llm_kv_cache_usage") == 0
    assert tail[-1].usage.completion_tokens == 3


def test_a_full_queue_is_resource_exhausted(tiny_checkpoint):
    # One sequence runs and two may wait: of 5 more requests sent while one runs, 3 are refused at once.
    # The first is running before the 5 are sent, so that how fast the worker admits it cannot decide
    # how many of the others fit (it counts as waiting until the worker schedules it).
    engine = Engine(
        load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))), max_waiting=2, max_running=1
    )

    async def body(stub, channel, address):
        long_req, info = request(engine, max_new_tokens=engine.max_model_len - 8, ignore_eos=True)
        first = stub.Generate(long_req)
        await first.read()  # its first token: it is running
        assert engine.num_running() == 1
        req, _ = request(engine, max_new_tokens=50, ignore_eos=True)
        tasks = [asyncio.ensure_future(collect(stub.Generate(req))) for _ in range(5)]
        for _ in range(200):  # the refusals come back while the first still runs
            if sum(t.done() for t in tasks) >= 3:
                break
            await asyncio.sleep(0.05)
        still_running = engine.num_running()
        first.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return still_running, results

    async def collect(call):
        return [m async for m in call]

    try:
        still_running, results = with_server(engine, body)
    finally:
        engine.stop()
    assert still_running == 1  # the long request was still running when the 3 were refused
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) == 3 and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "waiting queue is full (2 requests)" in refused[0].details()
    assert len(served) == 2 and all(r[-1].usage.completion_tokens == 50 for r in served)


def test_health_reflection_and_model_info(engine):
    async def body(stub, channel, address):
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE)
        )
        info = await stub.GetModelInfo(llm_pb2.LLMModelInfoRequest())
        refl = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in refl for s in r.list_services_response.service]
        return health.status, info, services

    status, info, services = with_server(engine, body)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert info.family == "llava" and info.image_token_id == engine.info().image_token_id
    assert SERVICE in services and "grpc.health.v1.Health" in services


def test_large_request_needs_the_raised_message_limit(wide_checkpoint):
    """A 5 MB request passes with our limits; a server left at gRPC's 4 MB default refuses it."""
    engine = Engine(load_language_model(LLMConfig(checkpoint=str(wide_checkpoint))))
    image_id, hidden = engine.info().image_token_id, engine.info().hidden_size
    rows = (5 << 20) // (hidden * 4) + 1
    assert rows + 2 < engine.max_model_len
    req, _ = request(
        engine,
        [1] + [image_id] * rows + [5],
        [ImageSpan(1, torch.randn(rows, hidden), "h")],
        max_new_tokens=1,
    )
    assert req.ByteSize() > 5 << 20

    async def body(stub, channel, address):
        return [m async for m in stub.Generate(req)]

    async def refused(stub, channel, address):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(req):
                pass
        return info.value.code()

    try:
        ok = with_server(engine, body)
        code = with_server(engine, refused, server_limit=4 << 20)  # gRPC's default receive limit
    finally:
        engine.stop()
    assert ok[-1].usage.prompt_tokens == rows + 2
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
