"""gRPC LLMService servicer: protobuf at the edge, Engine inside."""

from __future__ import annotations

from llm_service.engine import Engine
from mmserve.grpc_util import map_errors
from mmserve.proto import llm_pb2, llm_pb2_grpc
from mmserve.wire import generate_output_to_pb, generate_request_from_pb


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @map_errors
    async def Generate(self, request, context):
        # Cancelling the RPC cancels this generator; Engine.generate's cleanup aborts the sequence.
        async for output in self.engine.generate(generate_request_from_pb(request)):
            yield generate_output_to_pb(output)

    @map_errors
    async def GetModelInfo(self, request, context):
        model = self.engine.model
        return llm_pb2.LLMModelInfo(
            family=model.family,
            max_model_len=self.engine.max_model_len,
            image_token_id=model.image_token_id,
            hidden_size=model.hidden_size,
            eos_token_ids=model.eos_token_ids,
        )
