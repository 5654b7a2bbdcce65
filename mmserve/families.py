"""The one registry of model families: which config.json means which family, and which class serves
each process's half of it. Adding a family is one entry here plus its three adapter classes; each
process imports only its own half."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from mmserve.checkpoint import read_config
from mmserve.errors import CheckpointError


@dataclass(frozen=True)
class Family:
    model_type: str  # the MODEL_TYPE (rtp-llm's name) this family answers to
    vision: str  # "module:Class" of the vision_service adapter
    language: str  # "module:Class" of the llm_service adapter
    prompt: str  # "module:Class" of the gateway's prompt adapter


FAMILIES: dict[str, Family] = {
    "llava": Family(
        "llava",
        "vision_service.models.llava:LlavaVision",
        "llm_service.models.llava:LlavaLanguageModel",
        "gateway.prompts:LlavaPrompt",
    ),
    "llava_next": Family(
        "llava",
        "vision_service.models.llava_next:LlavaNextVision",
        "llm_service.models.llava:LlavaLanguageModel",
        "gateway.prompts:LlavaPrompt",
    ),
    "llava_original": Family(
        "llava",
        "vision_service.models.llava_original:LlavaOriginalVision",
        "llm_service.models.llava_original:LlavaOriginalLanguageModel",
        "gateway.prompt_llava_original:LlavaOriginalPrompt",
    ),
    "qwen2_vl": Family(
        "qwen2_vl",
        "vision_service.models.qwen2_vl:Qwen2VLVision",
        "llm_service.models.qwen2_vl:Qwen2VLLanguageModel",
        "gateway.prompt_qwen2_vl:Qwen2VLPrompt",
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        "vision_service.models.qwen2_vl:Qwen2VLVision",
        "llm_service.models.qwen2_vl:Qwen2VLLanguageModel",
        "gateway.prompt_qwen2_vl:Qwen2VLPrompt",
    ),
    "qwen_vl": Family(
        "qwen_vl",
        "vision_service.models.qwen_vl:QwenVLVision",
        "llm_service.models.qwen_vl:QwenVLLanguageModel",
        "gateway.prompt_qwen_vl:QwenVLPrompt",
    ),
}

# MODEL_TYPE values and the families they may mean (config.json picks among several).
MODEL_TYPES = ("llava", "qwen_vl", "qwen2_vl", "qwen2_5_vl")


def recognise(config: dict) -> str | None:
    """The family a config.json describes, whether or not this build serves it."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if "mm_vision_tower" in config:
        return "llava_original"
    if model_type == "llava_next" or "LlavaNextForConditionalGeneration" in architectures:
        return "llava_next"
    if model_type == "llava" or "LlavaForConditionalGeneration" in architectures:
        return "llava"
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return model_type
    if model_type == "qwen" and "visual" in config:
        return "qwen_vl"
    return None


def detect_family(checkpoint: str | Path, model_type: str | None = None) -> str:
    """The served family of a checkpoint, from config.json; MODEL_TYPE, when given, must agree."""
    if model_type and model_type not in MODEL_TYPES:
        raise CheckpointError(f"MODEL_TYPE={model_type!r} is not one of {MODEL_TYPES}")
    config = read_config(checkpoint)
    family = recognise(config)
    if family is None:
        raise CheckpointError(
            f"{checkpoint}: cannot tell the model family from config.json (model_type="
            f"{config.get('model_type')!r}, architectures={config.get('architectures')}); served: {sorted(FAMILIES)}"
        )
    if family not in FAMILIES:
        raise CheckpointError(f"{checkpoint}: {family} checkpoints are recognised but not served yet")
    if model_type and FAMILIES[family].model_type != model_type:
        raise CheckpointError(f"MODEL_TYPE={model_type!r} but {checkpoint} is a {family} checkpoint")
    return family


def adapter(family: str, half: str):
    """The class serving `half` ("vision", "language" or "prompt") of `family`."""
    module, _, name = getattr(FAMILIES[family], half).partition(":")
    return getattr(importlib.import_module(module), name)
