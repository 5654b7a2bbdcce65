import json
import re
from dataclasses import replace

import pytest

from gateway.prompt_llava import LlavaPrompt
from mmserve import families
from mmserve.errors import CheckpointError
from mmserve.families import FAMILIES, adapter, config_says, detect_family, recognise, register
from mmserve.interfaces import HALVES, VisionAdapter


@pytest.mark.parametrize(
    "config,family",
    [
        ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "llava"),
        ({"model_type": "llava_next"}, "llava_next"),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "llava_original"),
        ({"model_type": "qwen2_vl"}, "qwen2_vl"),
        ({"model_type": "qwen2_5_vl"}, "qwen2_5_vl"),
        ({"model_type": "qwen", "visual": {"image_size": 448}}, "qwen_vl"),
        ({"model_type": "bert"}, None),
    ],
)
def test_config_json_decides_the_family(config, family):
    assert recognise(config) == family


def test_detection_and_model_type(tiny_checkpoint, tmp_path):
    assert detect_family(tiny_checkpoint) == "llava"
    assert detect_family(tiny_checkpoint, "llava") == "llava"
    with pytest.raises(CheckpointError, match="is a llava checkpoint"):
        detect_family(tiny_checkpoint, "qwen2_vl")
    with pytest.raises(CheckpointError, match="not one of"):
        detect_family(tiny_checkpoint, "gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="cannot tell the model family"):
        detect_family(tmp_path)
    assert adapter("llava", "vision").__name__ == "LlavaVision"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_half_of_every_family_implements_its_interface(family):
    for half, interface in HALVES.items():
        cls = adapter(family, half)  # checked by the registry as it hands it out
        assert issubclass(cls, interface) and cls.family


class _NotAnAdapter:
    family = "broken"


class _HalfAVisionAdapter(VisionAdapter):
    family = "broken"

    @staticmethod
    def load_processor(checkpoint):
        return None


class _NamelessPrompt(LlavaPrompt):
    family = ""


@pytest.mark.parametrize(
    "cls,half,error",
    [
        (_NotAnAdapter, "prompt", "is not a subclass of PromptAdapter"),
        (
            _HalfAVisionAdapter,
            "vision",
            "does not implement VisionAdapter's __call__, collate, from_checkpoint, hidden_size",
        ),
        (_NamelessPrompt, "prompt", "does not set PromptAdapter's family"),
    ],
)
def test_the_registry_refuses_a_class_that_does_not_implement_its_half(monkeypatch, cls, half, error):
    monkeypatch.setattr(families, "FAMILIES", dict(FAMILIES))
    where = f"{__name__}:{cls.__name__}"
    llava = FAMILIES["llava"]
    register("broken", replace(llava, **{half: where}, matches=config_says("broken")))
    assert recognise({"model_type": "broken"}) == "broken"
    with pytest.raises(TypeError, match=re.escape(f"the broken {half} adapter {where} {error}")):
        adapter("broken", half)


def test_a_registered_family_is_tried_first(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", dict(FAMILIES))
    register("toy", replace(FAMILIES["llava"], model_type="toy", matches=config_says(architecture="Toy")))
    assert next(iter(families.FAMILIES)) == "toy"
    assert recognise({"model_type": "llava", "architectures": ["Toy"]}) == "toy"
    assert recognise({"model_type": "llava"}) == "llava"
    assert "toy" in families.model_types()
