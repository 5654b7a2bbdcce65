"""LLaVA-NeXT (anyres tiling, image_newline) through the stack and the Pipeline, against transformers'
LlavaNextForConditionalGeneration on the same tiny checkpoint."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from pipeline import ModelFactory, Pipeline
from tests.checkpoints.llava_variants import build_llava_next_checkpoint
from tests.helpers import Stack, data_url, greedy_chat, make_image, openai_client

MAX_TOKENS = 16
# (width, height): wide, tall, square, very wide (a 3x1 grid), exactly one crop.
SIZES = {"wide": (80, 60), "tall": (50, 90), "square": (120, 120), "strip": (200, 40), "crop": (56, 56)}


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    return build_llava_next_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next", seed=3)


@pytest.fixture(scope="module")
def images():
    return {name: make_image(w, h, seed=10 + i) for i, (name, (w, h)) in enumerate(SIZES.items())}


class NextReference:
    def __init__(self, checkpoint):
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def chat_prompt(self, text: str, num_images: int) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    def inputs(self, prompt: str, images: list[bytes]):
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        return self.processor(text=prompt, images=pil or None, return_tensors="pt")

    @torch.inference_mode()
    def greedy(self, prompt: str, images: list[bytes], max_new_tokens: int) -> tuple[list[int], list[int]]:
        inputs = self.inputs(prompt, images)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        prompt_ids = inputs["input_ids"][0].tolist()
        return prompt_ids, out[0, len(prompt_ids) :].tolist()

    def num_image_tokens(self, image: bytes) -> int:
        ids = self.inputs("<image>", [image])["input_ids"][0]
        return int((ids == self.model.config.image_token_index).sum())


@pytest.fixture(scope="module")
def reference(next_checkpoint):
    return NextReference(next_checkpoint)


CASES = [
    ("What is in the image?", ["wide"]),
    ("Describe this picture.", ["tall"]),
    ("What colour is it?", ["square"]),
    ("Where is the car?", ["strip"]),
    ("Compare the two pictures.", ["wide", "strip"]),
    ("Describe a red car on the left.", []),
]
IDS = ["wide", "tall", "square", "strip", "two-images", "no-image"]


def test_vision_adapter_equals_transformers(next_checkpoint, reference, images):
    """Per image: N_i equals the HF processor's count, and the features equal get_image_features."""
    from vision_service.models.llava_next import LlavaNextVision

    vision = LlavaNextVision.from_checkpoint(str(next_checkpoint), torch.float32, "cpu")
    processor = vision.load_processor(str(next_checkpoint))
    names = list(SIZES)
    items = [
        {
            k: torch.from_numpy(v)
            for k, v in vision.preprocess_one(processor, Image.open(io.BytesIO(images[n]))).items()
        }
        for n in names
    ]
    assert len({item["pixel_values"].shape[0] for item in items}) > 1, "the batch should mix crop counts"
    batched = vision(**vision.collate(items))  # images of different crop counts in one forward
    for name, item, ours in zip(names, items, batched, strict=True):
        inputs = reference.inputs("<image>", [images[name]])
        with torch.inference_mode():
            ref = reference.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        ref_features = ref.pooler_output[0]
        assert ours.shape[0] == reference.num_image_tokens(images[name]), name
        torch.testing.assert_close(ours, ref_features, rtol=1e-5, atol=1e-5)
        alone = vision(**vision.collate([item]))[0]
        torch.testing.assert_close(alone, ours, rtol=1e-5, atol=1e-5)
    assert len({f.shape[0] for f in batched}) > 2, "different sizes should give different token counts"


@pytest.fixture(scope="module")
def client(next_checkpoint, tmp_path_factory):
    stack = Stack(next_checkpoint, tmp_path_factory.mktemp("logs")).start()
    try:
        yield openai_client(stack)
    finally:
        stack.stop()


@pytest.mark.parametrize("text,names", CASES, ids=IDS)
def test_stack_greedy_equals_reference(client, reference, images, text, names):
    response = greedy_chat(client, text, [data_url(images[n]) for n in names], MAX_TOKENS)
    ref_prompt, ref_new = reference.greedy(
        reference.chat_prompt(text, len(names)), [images[n] for n in names], MAX_TOKENS
    )
    assert response.model_extra["prompt_token_ids"] == ref_prompt  # hence every N_i equals the processor's
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == ref_new
    assert len(set(ref_new)) > 1, "the reference output is degenerate; the comparison would be weak"
    assert choice.message.content == reference.processor.tokenizer.decode(ref_new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def pipeline(next_checkpoint):
    model = ModelFactory.from_huggingface(str(next_checkpoint))
    assert model.family == "llava_next"
    pipe = Pipeline(model, model.tokenizer)
    yield pipe
    pipe.stop()


@pytest.mark.parametrize(
    "names", [["square"], ["tall", "wide"], ["crop"]], ids=["square", "two-images", "crop"]
)
def test_pipeline_greedy_equals_reference(pipeline, reference, images, names, tmp_path):
    prompt = "USER: " + "<image>\n" * len(names) + "What is this? ASSISTANT:"
    paths = []
    for name in names:
        (tmp_path / f"{name}.png").write_bytes(images[name])
        paths.append(str(tmp_path / f"{name}.png"))
    responses = list(pipeline(prompt, urls=paths, generate_config={"top_k": 1, "max_new_tokens": MAX_TOKENS}))
    _, ref_new = reference.greedy(prompt, [images[n] for n in names], MAX_TOKENS)
    assert responses[-1].finished == [True]
    assert responses[-1].token_ids[0] == ref_new


def test_images_change_the_answer(client, images):
    def answer(name: str) -> list[int]:
        response = greedy_chat(client, "What is this?", [data_url(images[name])], MAX_TOKENS)
        return response.choices[0].model_extra["token_ids"]

    assert len({tuple(answer(name)) for name in ("wide", "tall", "square")}) > 1
