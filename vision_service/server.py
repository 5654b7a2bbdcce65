"""gRPC VisionService servicer: protobuf at the edge, VisionEncoder inside."""

from __future__ import annotations

import time

from mmserve.grpc_util import map_errors
from mmserve.proto import vision_pb2, vision_pb2_grpc
from mmserve.resend import CACHE_ID_METADATA
from mmserve.tensor_codec import dtype_name
from mmserve.wire_pb import image_features_to_pb, image_input_from_pb, pixel_limits_from_pb
from vision_service.encoder import VisionEncoder


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, encoder: VisionEncoder):
        self.encoder = encoder

    @map_errors
    async def Embed(self, request, context):
        # First, so that a NOT_FOUND carries it too: the client learns which replica lacked the image.
        await context.send_initial_metadata(((CACHE_ID_METADATA, self.encoder.cache.id),))
        images = [image_input_from_pb(image) for image in request.images]
        remaining = context.time_remaining()  # None without a client deadline
        deadline = None if remaining is None else time.monotonic() + remaining
        features = await self.encoder.embed_async(images, deadline, pixel_limits_from_pb(request))
        return vision_pb2.EmbedResponse(embeddings=[image_features_to_pb(f) for f in features])

    @map_errors
    async def GetModelInfo(self, request, context):
        return vision_pb2.VisionModelInfo(
            family=self.encoder.family,
            hidden_size=self.encoder.hidden_size,
            dtype=dtype_name(self.encoder.dtype),
        )
