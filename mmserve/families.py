"""The one registry of model families: which config.json means which family, and which class serves
each process's half of it (declared in mmserve/interfaces.py). Each process imports only its own half."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from mmserve.checkpoint import read_config
from mmserve.errors import CheckpointError
from mmserve.interfaces import HALVES, LanguageAdapter, PromptAdapter, VisionAdapter


@dataclass(frozen=True)
class Family:
    model_type: str  # the MODEL_TYPE (rtp-llm's name) this family answers to
    vision: str  # "module:Class" of the vision_service adapter (a VisionAdapter)
    language: str  # "module:Class" of the llm_service adapter (a LanguageAdapter)
    prompt: str  # "module:Class" of the gateway's prompt adapter (a PromptAdapter)
    matches: Callable[[dict], bool]  # does this config.json describe the family


def config_says(model_type: str | None = None, architecture: str | None = None) -> Callable[[dict], bool]:
    """A config.json test: its model_type is `model_type`, or its architectures list `architecture`."""

    def test(config: dict) -> bool:
        architectures = config.get("architectures") or []
        return (model_type is not None and config.get("model_type") == model_type) or (
            architecture is not None and architecture in architectures
        )

    return test


# The first family whose `matches` accepts a config.json is its family: more specific ones come first
# (an original LLaVA config says model_type "llava" too).
FAMILIES: dict[str, Family] = {
    "llava_original": Family(
        "llava",
        "vision_service.models.llava_original:LlavaOriginalVision",
        "llm_service.models.llava_original:LlavaOriginalLanguageModel",
        "gateway.prompt_llava_original:LlavaOriginalPrompt",
        lambda config: "mm_vision_tower" in config,
    ),
    "llava_next": Family(
        "llava",
        "vision_service.models.llava_next:LlavaNextVision",
        "llm_service.models.llava:LlavaLanguageModel",
        "gateway.prompt_llava:LlavaPrompt",
        config_says("llava_next", "LlavaNextForConditionalGeneration"),
    ),
    "llava": Family(
        "llava",
        "vision_service.models.llava:LlavaVision",
        "llm_service.models.llava:LlavaLanguageModel",
        "gateway.prompt_llava:LlavaPrompt",
        config_says("llava", "LlavaForConditionalGeneration"),
    ),
    "qwen2_vl": Family(
        "qwen2_vl",
        "vision_service.models.qwen2_vl:Qwen2VLVision",
        "llm_service.models.qwen2_vl:Qwen2VLLanguageModel",
        "gateway.prompt_qwen2_vl:Qwen2VLPrompt",
        config_says("qwen2_vl"),
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        "vision_service.models.qwen2_vl:Qwen2VLVision",
        "llm_service.models.qwen2_vl:Qwen2VLLanguageModel",
        "gateway.prompt_qwen2_vl:Qwen2VLPrompt",
        config_says("qwen2_5_vl"),
    ),
    "qwen_vl": Family(
        "qwen_vl",
        "vision_service.models.qwen_vl:QwenVLVision",
        "llm_service.models.qwen_vl:QwenVLLanguageModel",
        "gateway.prompt_qwen_vl:QwenVLPrompt",
        lambda config: config.get("model_type") == "qwen" and "visual" in config,
    ),
}


def register(name: str, family: Family) -> None:
    """Serve another family, tried before the known ones (a new family is usually a more specific
    variant of one of them). For plugins and tests; the families of this build are listed above."""
    known = dict(FAMILIES)
    FAMILIES.clear()
    FAMILIES[name] = family
    FAMILIES.update((key, value) for key, value in known.items() if key != name)


def model_types() -> tuple[str, ...]:
    """The MODEL_TYPE values accepted (config.json picks among the families of one)."""
    return tuple(dict.fromkeys(family.model_type for family in FAMILIES.values()))


def recognise(config: dict) -> str | None:
    """The family a config.json describes; None when no served family does."""
    return next((name for name, family in FAMILIES.items() if family.matches(config)), None)


def detect_family(checkpoint: str | Path, model_type: str | None = None) -> str:
    """The served family of a checkpoint, from config.json; MODEL_TYPE, when given, must agree."""
    if model_type and model_type not in model_types():
        raise CheckpointError(f"MODEL_TYPE={model_type!r} is not one of {model_types()}")
    config = read_config(checkpoint)
    family = recognise(config)
    if family is None:
        raise CheckpointError(
            f"{checkpoint}: cannot tell the model family from config.json (model_type="
            f"{config.get('model_type')!r}, architectures={config.get('architectures')}); served: {sorted(FAMILIES)}"
        )
    if model_type and FAMILIES[family].model_type != model_type:
        raise CheckpointError(f"MODEL_TYPE={model_type!r} but {checkpoint} is a {family} checkpoint")
    return family


@overload
def adapter(family: str, half: Literal["vision"]) -> type[VisionAdapter]: ...
@overload
def adapter(family: str, half: Literal["language"]) -> type[LanguageAdapter]: ...
@overload
def adapter(family: str, half: Literal["prompt"]) -> type[PromptAdapter]: ...
def adapter(family: str, half: str) -> type:
    """The class serving `half` ("vision", "language" or "prompt") of `family`, checked against the
    half's declared interface (mmserve/interfaces.py)."""
    if half not in HALVES:
        raise ValueError(f"half {half!r} is not one of {sorted(HALVES)}")
    entry = FAMILIES[family]
    where = {"vision": entry.vision, "language": entry.language, "prompt": entry.prompt}[half]
    module, _, name = where.partition(":")
    cls = getattr(importlib.import_module(module), name)
    check_implements(cls, HALVES[half], f"the {family} {half} adapter {where}")
    return cls


def check_implements(cls: object, interface: type, what: str) -> None:
    """TypeError unless `cls` is a concrete subclass of `interface` that sets its class attributes."""
    if not (isinstance(cls, type) and issubclass(cls, interface)):
        raise TypeError(f"{what} is not a subclass of {interface.__name__} (mmserve/interfaces.py)")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))  # type: ignore[attr-defined]
        raise TypeError(f"{what} does not implement {interface.__name__}'s {missing}")
    # ClassVar declarations without a default (family, image_tag): each family sets its own.
    declared = [name for name, kind in interface.__annotations__.items() if str(kind).startswith("ClassVar")]
    unset = [name for name in declared if name not in vars(interface) and not getattr(cls, name, None)]
    if unset:
        raise TypeError(f"{what} does not set {interface.__name__}'s {', '.join(unset)}")
