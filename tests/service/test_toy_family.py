"""A family added the way README's "How to add a family" says, in one file: its three halves (here
subclasses of the LLaVA family under the name toy_llava), its registry entry and its checkpoint builder.
The registry hands out its classes, each passes the interface check, and a real vision service and a
real LLM service on loopback serve it: greedy tokens equal transformers' on the same checkpoint."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from gateway.clients import GrpcLLMClient, GrpcVisionClient
from gateway.prompt_llava import LlavaPrompt
from gateway.prompts import expand_image_tokens
from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from llm_service.models.llava import LlavaLanguageModel
from llm_service.server import LLMServicer
from mmserve import families
from mmserve.families import Family, adapter, check_implements, config_says, detect_family
from mmserve.grpc_util import start_server
from mmserve.images import content_hash
from mmserve.interfaces import HALVES
from mmserve.proto import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from mmserve.wire import GenerateRequest, ImageInput, SamplingParams
from tests.reference import LlavaReference
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder
from vision_service.models.llava import LlavaVision
from vision_service.server import VisionServicer

# ---- the family: one class per process (vision_service/models/, llm_service/models/, gateway/) ----


class ToyLlavaVision(LlavaVision):
    family = "toy_llava"


class ToyLlavaLanguageModel(LlavaLanguageModel):
    family = "toy_llava"


class ToyLlavaPrompt(LlavaPrompt):
    family = "toy_llava"


# ---- its registry entry (mmserve/families.py) ----------------------------------------------------

TOY_ARCHITECTURE = "ToyLlavaForConditionalGeneration"
TOY = Family(
    "llava",
    f"{__name__}:ToyLlavaVision",
    f"{__name__}:ToyLlavaLanguageModel",
    f"{__name__}:ToyLlavaPrompt",
    config_says(architecture=TOY_ARCHITECTURE),
)


# ---- its test checkpoint builder (tests/checkpoints/) --------------------------------------------


def build_toy_checkpoint(llava_checkpoint: Path, folder: Path) -> Path:
    """A tiny llava-hf checkpoint whose config.json names the toy's architecture."""
    shutil.copytree(llava_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [TOY_ARCHITECTURE]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def toy_checkpoint(tiny_checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # registered for this module only
        families.register("toy_llava", TOY)
        yield build_toy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("toy") / "toy-llava")


def test_the_registry_hands_out_the_toy_family(toy_checkpoint, tiny_checkpoint):
    assert detect_family(toy_checkpoint) == "toy_llava" == detect_family(toy_checkpoint, "llava")
    assert detect_family(tiny_checkpoint) == "llava"  # the toy's rule does not take over plain LLaVA
    halves = {"vision": ToyLlavaVision, "language": ToyLlavaLanguageModel, "prompt": ToyLlavaPrompt}
    for half, cls in halves.items():
        assert adapter("toy_llava", half) is cls
        check_implements(cls, HALVES[half], f"toy {half}")


def _serve(encoder: VisionEncoder, engine: Engine, body):
    """`await body(vision client, llm client)` against real VisionService and LLMService servers."""

    async def go():
        vision_server, _, vision_port = await start_server(
            lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(encoder), s),
            vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name,
            "127.0.0.1",
            0,
            64 << 20,
        )
        llm_server, _, llm_port = await start_server(
            lambda s: llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(engine), s),
            llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name,
            "127.0.0.1",
            0,
            64 << 20,
        )
        vision = GrpcVisionClient(f"127.0.0.1:{vision_port}", 64 << 20, 60)
        llm = GrpcLLMClient(f"127.0.0.1:{llm_port}", 64 << 20, 60)
        try:
            return await body(vision, llm)
        finally:
            await vision.close()
            await llm.close()
            await vision_server.stop(0)
            await llm_server.stop(0)

    return asyncio.run(go())


def test_the_toy_family_is_served(toy_checkpoint, image_dir):
    path = str(toy_checkpoint)
    prompt = adapter("toy_llava", "prompt")(path, path)
    encoder = VisionEncoder(VisionConfig(checkpoint=path))
    engine = Engine(load_language_model(LLMConfig(checkpoint=path)))
    assert isinstance(prompt, ToyLlavaPrompt)
    assert isinstance(encoder.model, ToyLlavaVision) and isinstance(engine.model, ToyLlavaLanguageModel)
    reference = LlavaReference(toy_checkpoint)
    text = reference.chat_prompt("What is in this picture?", 1)
    image = (image_dir / "a.png").read_bytes()

    async def body(vision: GrpcVisionClient, llm: GrpcLLMClient):
        features = await vision.embed([ImageInput(image, content_hash(image))], "toy")
        ids, spans = expand_image_tokens(prompt.tokenize(text), prompt.image_token_id, features)
        request = GenerateRequest("toy", ids, spans, SamplingParams(temperature=0.0, max_new_tokens=12))
        tokens = [t async for output in llm.generate(request) for t in output.token_ids]
        return ids, tokens

    try:
        ids, tokens = _serve(encoder, engine, body)
    finally:
        engine.stop()
        encoder.close()
    ref_prompt, ref_tokens = reference.greedy(text, [image], 12)
    assert ids == ref_prompt
    assert tokens == ref_tokens and tokens
