"""The internal shared secret on a real LLM service on loopback: calls without it or with a wrong one are
refused with UNAUTHENTICATED and a clear message, calls with it are served (also through the gateway's
client), health and reflection need none; where the secret comes from (flag/env or file)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.clients import GrpcLLMClient
from gateway.config import GatewayConfig
from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from llm_service.server import LLMServicer
from mmserve.errors import UnavailableError
from mmserve.internal_auth import TOKEN_ENV, TOKEN_FILE_ENV, call_metadata, resolve_token
from mmserve.proto import llm_pb2, llm_pb2_grpc
from mmserve.wire import GenerateRequest, SamplingParams
from mmserve.wire_pb import generate_request_to_pb
from tests.helpers import grpc_service

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name
SECRET = "s3cret-token"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = Engine(load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint))))
    yield engine
    engine.stop()


def with_guarded_server(engine, body):
    """`await body(stub, channel, address)` against an LLM service that requires SECRET."""

    def add(server):
        llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(engine), server)

    async def go():
        async with grpc_service(add, SERVICE, internal_token=SECRET) as address:
            async with grpc.aio.insecure_channel(address) as channel:
                return await body(llm_pb2_grpc.LLMServiceStub(channel), channel, address)

    return asyncio.run(go())


def generate_request() -> llm_pb2.GenerateRequest:
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    return generate_request_to_pb(GenerateRequest("r", [1, 40, 41], [], params))


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def test_calls_without_the_token_or_with_a_wrong_one_are_unauthenticated(engine):
    async def body(stub, channel, address):
        missing = await refusal(stub.GetModelInfo(llm_pb2.LLMModelInfoRequest()))
        wrong = await refusal(
            stub.GetModelInfo(llm_pb2.LLMModelInfoRequest(), metadata=call_metadata("nope"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as streamed:  # a server-streaming call is refused too
            async for _ in stub.Generate(generate_request(), metadata=(("authorization", "Bearer "),)):
                pass
        return missing, wrong, streamed.value

    missing, wrong, streamed = with_guarded_server(engine, body)
    assert {missing.code(), wrong.code(), streamed.code()} == {grpc.StatusCode.UNAUTHENTICATED}
    assert "missing internal token" in missing.details() and TOKEN_ENV in missing.details()
    assert "invalid internal token" in wrong.details()
    assert "invalid internal token" in streamed.details() and SECRET not in streamed.details()


def test_calls_with_the_token_are_served(engine):
    async def body(stub, channel, address):
        metadata = call_metadata(SECRET)
        info = await stub.GetModelInfo(llm_pb2.LLMModelInfoRequest(), metadata=metadata)
        tokens = [t async for m in stub.Generate(generate_request(), metadata=metadata) for t in m.token_ids]
        client = GrpcLLMClient(address, 64 << 20, token=SECRET)  # the gateway's client sends it itself
        try:
            client_info = await client.model_info()
        finally:
            await client.close()
        for token in (None, "not-the-secret"):  # a deployment error: a 503 naming the setting, not a 500
            unauthorized = GrpcLLMClient(address, 64 << 20, token=token)
            try:
                with pytest.raises(UnavailableError, match="refused the gateway's internal token") as caught:
                    await unauthorized.model_info()
                assert "MMSERVE_INTERNAL_TOKEN" in str(caught.value) and SECRET not in str(caught.value)
            finally:
                await unauthorized.close()
        return info, tokens, client_info

    info, tokens, client_info = with_guarded_server(engine, body)
    assert info.max_model_len > 0 and len(tokens) == 3
    assert client_info.max_model_len == info.max_model_len


def test_health_and_reflection_need_no_token(engine):
    async def body(stub, channel, address):
        health = health_pb2_grpc.HealthStub(channel)
        status = (await health.Check(health_pb2.HealthCheckRequest())).status
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
        return status, [s.name for s in replies[0].list_services_response.service]

    status, services = with_guarded_server(engine, body)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE in services


def test_the_token_comes_from_the_flag_the_variable_or_a_file(tmp_path, monkeypatch, tiny_checkpoint):
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")
    assert resolve_token(None, str(secret_file)) == SECRET
    assert resolve_token(None, None) is None and resolve_token("", None) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_token("x", str(secret_file))
    with pytest.raises(ValueError, match="cannot read"):
        resolve_token(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_token(None, str(tmp_path / "empty"))

    checkpoint = ["--checkpoint", str(tiny_checkpoint)]
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret_file))
    assert LLMConfig.from_args(checkpoint).internal_token == SECRET
    assert GatewayConfig.from_args(checkpoint).internal_token == SECRET
    monkeypatch.delenv(TOKEN_FILE_ENV)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    config = LLMConfig.from_args(checkpoint)
    assert config.internal_token == "from-env" and "from-env" not in repr(config)
    assert LLMConfig.from_args([*checkpoint, "--internal-token", "flag"]).internal_token == "flag"
