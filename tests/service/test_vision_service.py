"""One real VisionService gRPC server and a real client; startup checks of both halves."""

from __future__ import annotations

import io
import shutil

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llm_service.config import LLMConfig
from llm_service.models import load_language_model
from mmserve.errors import CheckpointError
from mmserve.images import content_hash
from mmserve.proto import vision_pb2
from mmserve.tensor_codec import tensor_from_pb
from tests.helpers import serve_vision
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder

SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    encoder = VisionEncoder(VisionConfig(checkpoint=str(tiny_checkpoint)))
    yield encoder
    encoder.close()


def embed(encoder, images: list[bytes]):
    async def body(stub, address):
        request = vision_pb2.EmbedRequest(
            request_id="t", images=[vision_pb2.ImageInput(data=d) for d in images]
        )
        return await stub.Embed(request)

    return serve_vision(encoder, body)


def test_embeddings_equal_transformers_get_image_features(encoder, tiny_checkpoint, image_dir):
    names = ["a.png", "b.jpg", "c.png"]
    data = [(image_dir / n).read_bytes() for n in names]
    response = embed(encoder, data)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    pixels = processor.image_processor(
        images=[Image.open(io.BytesIO(d)).convert("RGB") for d in data], return_tensors="pt"
    )
    with torch.inference_mode():
        expected = model.model.get_image_features(pixels["pixel_values"]).pooler_output
    assert len(response.embeddings) == 3
    for got, want, raw in zip(response.embeddings, expected, data, strict=True):
        tensor = tensor_from_pb(got.embedding)
        assert tensor.shape == want.shape == (16, 64)
        torch.testing.assert_close(tensor, want, rtol=0, atol=1e-5)
        assert got.content_hash == content_hash(raw)
        assert list(got.grid_thw) == []


def test_bad_image_is_invalid_argument_naming_its_index(encoder, image_dir):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        embed(encoder, [(image_dir / "a.png").read_bytes(), b"garbage"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1" in info.value.details()
    # the service is still fine afterwards
    assert len(embed(encoder, [(image_dir / "a.png").read_bytes()]).embeddings) == 1


def _without_key(src, dst, predicate):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    dropped = next(k for k in sorted(state) if predicate(k))
    del state[dropped]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dropped


def test_a_missing_vision_weight_stops_startup(tiny_checkpoint, tmp_path):
    dropped = _without_key(tiny_checkpoint, tmp_path / "ck", lambda k: k.startswith("multi_modal_projector."))
    with pytest.raises(CheckpointError, match="missing 1"):
        VisionEncoder(VisionConfig(checkpoint=str(tmp_path / "ck")))
    assert dropped.startswith("multi_modal_projector.")


def test_a_missing_language_weight_stops_startup(tiny_checkpoint, tmp_path):
    _without_key(
        tiny_checkpoint, tmp_path / "ck", lambda k: "layers.1.mlp" in k and k.startswith("language_model.")
    )
    with pytest.raises(CheckpointError, match="missing 1"):
        load_language_model(LLMConfig(checkpoint=str(tmp_path / "ck")))


def test_each_half_loads_only_its_weights(encoder, tiny_checkpoint):
    assert not any("language_model" in n or "lm_head" in n for n, _ in encoder.model.named_parameters())
    lm = load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))
    assert not any("vision" in n or "projector" in n for n, _ in lm.decoder.named_parameters())
