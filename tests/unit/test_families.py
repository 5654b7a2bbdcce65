import json

import pytest

from mmserve.errors import CheckpointError
from mmserve.families import adapter, detect_family, recognise


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
