"""gRPC LLMService servicer: protobuf at the edge, Engine inside."""

from __future__ import annotations

import asyncio

from llm_service.engine import Engine
from mmserve.grpc_util import map_errors
from mmserve.proto import llm_pb2_grpc
from mmserve.wire_pb import generate_output_to_pb, generate_request_from_pb, llm_info_to_pb


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @map_errors
    async def Generate(self, request, context):
        # Cancelling the RPC cancels this generator; Engine.generate's cleanup aborts the sequence.
        # Decoding image tensors copies megabytes: off the event loop, like the engine's admission
        # checks and hashing of them.
        if request.images:
            converted = await asyncio.to_thread(generate_request_from_pb, request)
        else:
            converted = generate_request_from_pb(request)
        async for output in self.engine.generate(converted):
            yield generate_output_to_pb(output)

    @map_errors
    async def GetModelInfo(self, request, context):
        return llm_info_to_pb(self.engine.info())
