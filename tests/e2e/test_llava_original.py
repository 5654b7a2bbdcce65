"""Original LLaVA layout (haotian-liu/LLaVA: LLaMA + model.mm_projector.*, CLIP tower in its own folder)
through the stack and the Pipeline, against transformers' LlavaForConditionalGeneration on the
equivalent llava-hf checkpoint (same random weights)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gateway.prompt_llava_original import VICUNA_V1_SYSTEM
from mmserve.errors import CheckpointError
from pipeline import ModelFactory, Pipeline
from tests.checkpoints.llava_variants import build_llava_original_checkpoint
from tests.helpers import ROOT, Stack, data_url, greedy_chat, make_image, openai_client
from tests.reference import LlavaReference

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(original-layout checkpoint, equivalent llava-hf checkpoint)."""
    root = tmp_path_factory.mktemp("ckpt")
    original = build_llava_original_checkpoint(
        root / "tiny-llava-original", hf_path=root / "tiny-llava-hf", seed=5
    )
    return original, root / "tiny-llava-hf"


@pytest.fixture(scope="module")
def reference(checkpoints):
    return LlavaReference(checkpoints[1])


@pytest.fixture(scope="module")
def images():
    return {
        "square": make_image(120, 120, seed=21),
        "small": make_image(40, 40, seed=22),
        "wide": make_image(90, 50, seed=23),
        "tall": make_image(45, 100, seed=24),
    }


def vicuna_prompt(text: str, num_images: int) -> str:
    return f"{VICUNA_V1_SYSTEM} USER: " + "<image>\n" * num_images + f"{text} ASSISTANT:"


def padded(image: bytes) -> bytes:
    """image_aspect_ratio=pad on the reference side, written independently of the service's code (numpy,
    as llava/mm_utils.py describes it): a square of the CLIP mean colour with the image centred."""
    from transformers import CLIPImageProcessorPil

    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    height, width = pixels.shape[:2]
    side = max(height, width)
    mean = [int(x * 255) for x in CLIPImageProcessorPil().image_mean]
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = mean
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = pixels
    buffer = io.BytesIO()
    Image.fromarray(square).save(buffer, "PNG")
    return buffer.getvalue()


def reference_inputs(images, names):
    # Square images need no padding; a padded non-square one is what the original layout sees.
    return [padded(images[n]) for n in names]


@pytest.fixture(scope="module")
def client(checkpoints, tmp_path_factory):
    stack = Stack(checkpoints[0], tmp_path_factory.mktemp("logs")).start()
    try:
        yield openai_client(stack)
    finally:
        stack.stop()


@pytest.mark.parametrize(
    "text,names",
    [
        ("What is in the image?", ["square"]),
        ("Describe this picture.", ["small"]),
        ("Compare the two pictures.", ["square", "small"]),
        ("What is on the left?", ["wide"]),
        ("What is at the top?", ["tall"]),
        ("Describe a red car on the left.", []),
    ],
    ids=["square", "small-square", "two-images", "wide-padded", "tall-padded", "no-image"],
)
def test_stack_greedy_equals_llava_hf_reference(client, reference, images, text, names):
    response = greedy_chat(client, text, [data_url(images[n]) for n in names], MAX_TOKENS)
    ref_prompt, ref_new = reference.greedy(
        vicuna_prompt(text, len(names)), reference_inputs(images, names), MAX_TOKENS
    )
    assert response.model_extra["prompt_token_ids"] == ref_prompt
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == ref_new
    assert len(set(ref_new)) > 1, "the reference output is degenerate; the comparison would be weak"
    assert choice.message.content == reference.processor.tokenizer.decode(ref_new, skip_special_tokens=True)


def test_vision_adapter_pads_like_the_original(checkpoints, reference, images):
    """Features equal llava-hf's on the padded image, and differ from llava-hf's unpadded default."""
    from vision_service.models.llava_original import LlavaOriginalVision

    vision = LlavaOriginalVision.from_checkpoint(str(checkpoints[0]), torch.float32, "cpu")
    processor = vision.load_processor(str(checkpoints[0]))
    item = vision.preprocess_one(processor, Image.open(io.BytesIO(images["wide"])).convert("RGB"))
    ours = vision(**vision.collate([{k: torch.from_numpy(v) for k, v in item.items()}]))[0]

    def hf_features(data: bytes) -> torch.Tensor:
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        pixels = reference.processor.image_processor(images=[pil], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return reference.model.model.get_image_features(pixel_values=pixels).pooler_output[0]

    torch.testing.assert_close(ours, hf_features(padded(images["wide"])), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, hf_features(images["wide"]), atol=1e-3)


@pytest.fixture(scope="module")
def pipeline(checkpoints):
    model = ModelFactory.from_huggingface(str(checkpoints[0]))
    assert model.family == "llava_original"
    pipe = Pipeline(model, model.tokenizer)
    yield pipe
    pipe.stop()


@pytest.mark.parametrize("names", [["square"], ["small", "wide"]], ids=["one-image", "two-images"])
def test_pipeline_greedy_equals_llava_hf_reference(pipeline, reference, images, names, tmp_path):
    prompt = vicuna_prompt("What is this?", len(names)).replace("<image>", "<img/>")  # alias accepted too
    paths = []
    for name in names:
        (tmp_path / f"{name}.png").write_bytes(images[name])
        paths.append(str(tmp_path / f"{name}.png"))
    responses = list(pipeline(prompt, urls=paths, generate_config={"top_k": 1, "max_new_tokens": MAX_TOKENS}))
    _, ref_new = reference.greedy(
        vicuna_prompt("What is this?", len(names)), reference_inputs(images, names), MAX_TOKENS
    )
    assert responses[-1].finished == [True]
    assert responses[-1].token_ids[0] == ref_new


@pytest.fixture
def broken_checkpoint(checkpoints, tmp_path):
    """The original checkpoint with one projector tensor removed (the CLIP folder path made absolute)."""
    import json

    original = checkpoints[0]
    broken = tmp_path / "broken"
    shutil.copytree(original, broken)
    config = json.loads((broken / "config.json").read_text())
    config["mm_vision_tower"] = str((original / config["mm_vision_tower"]).resolve())
    (broken / "config.json").write_text(json.dumps(config))
    state = load_file(str(broken / "model.safetensors"))
    del state["model.mm_projector.2.bias"]
    save_file(state, str(broken / "model.safetensors"))
    return broken


def test_missing_projector_key_is_a_startup_error(broken_checkpoint):
    from vision_service.models.llava_original import LlavaOriginalVision

    with pytest.raises(CheckpointError, match=r"mm_projector.*missing 1.*2\.bias"):
        LlavaOriginalVision.from_checkpoint(str(broken_checkpoint), torch.float32, "cpu")

    # The vision service process refuses to start, naming the key.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vision_service",
            "--checkpoint",
            str(broken_checkpoint),
            "--port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "2.bias" in proc.stdout + proc.stderr


def test_prompt_with_im_start_end(tmp_path):
    """mm_use_im_start_end: each image is <im_start><image><im_end>, as the original code writes it."""
    from gateway.prompt_llava_original import LlavaOriginalPrompt

    path = build_llava_original_checkpoint(
        tmp_path / "se", hf_path=tmp_path / "se-hf", mm_use_im_start_end=True
    )
    prompt = LlavaOriginalPrompt(str(path), str(path))
    text = prompt.render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    )
    assert "USER: <im_start><image><im_end>\nHi ASSISTANT:" in text
    assert prompt.normalize_raw("USER: <image>\nHi") == "USER: <im_start><image><im_end>\nHi"
    assert prompt.normalize_raw(text) == text
    ids = prompt.tokenize(text)
    start, end = prompt.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    at = ids.index(prompt.image_token_id)
    assert ids[at - 1 : at + 2] == [start, prompt.image_token_id, end]
