"""Qwen2-VL and Qwen2.5-VL end to end: the three-process stack (official openai client) and the in-process
Pipeline, token-identical to transformers' own `generate` on the same tiny checkpoint (float32)."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from pipeline import ModelFactory, Pipeline
from tests.checkpoints.qwen2_vl import build_qwen2_vl_checkpoint
from tests.helpers import data_url, make_image, serving

MAX_TOKENS = 16
VERSIONS = ["qwen2_vl", "qwen2_5_vl"]
# Several sizes and aspect ratios: each gets its own patch grid (4..16 merged tokens by default).
IMAGES = {
    "a.png": (80, 60, 1),
    "b.jpg": (50, 90, 2),
    "c.png": (120, 120, 3),
    "wide.png": (300, 40, 4),
    "tall.png": (36, 250, 5),
    "big.png": (400, 300, 6),
}


class QwenReference:
    """transformers' Qwen2(.5)-VL on the HF processor pieces: tokenizer +
    Qwen2VLImageProcessorPil, `<|image_pad|>` expanded to grid.prod()//4, mm_token_type_ids."""

    def __init__(self, checkpoint, version: str):
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
        model_class = (
            Qwen2VLForConditionalGeneration if version == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
        )
        self.model = model_class.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def chat_prompt(self, text: str, num_images: int) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    @torch.inference_mode()
    def greedy(
        self,
        prompt: str,
        images: list[bytes],
        max_new_tokens: int = MAX_TOKENS,
        max_pixels: int | None = None,
        checkpoint_defaults: bool = False,
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, new ids) of greedy `generate`; with `checkpoint_defaults`, of `generate` with
        no sampling arguments at all (the checkpoint's generation_config.json decides)."""
        kwargs = {} if checkpoint_defaults else {"do_sample": False}
        if images:
            size = dict(self.image_processor.size)
            if max_pixels is not None:
                size["longest_edge"] = max_pixels
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
            pixels = self.image_processor(images=pil, size=size, return_tensors="pt")
            pieces = prompt.split("<|image_pad|>")
            assert len(pieces) == len(images) + 1
            counts = [int(g.prod()) // 4 for g in pixels["image_grid_thw"]]
            prompt = pieces[0] + "".join(
                "<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:], strict=True)
            )
            kwargs |= {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        encoded = self.tokenizer(prompt, return_tensors="pt")
        ids = encoded["input_ids"]
        out = self.model.generate(
            input_ids=ids,
            attention_mask=encoded["attention_mask"],
            mm_token_type_ids=(ids == self.pad).int(),
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
        return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def qwen_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-images")
    for name, (width, height, seed) in IMAGES.items():
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        (folder / name).write_bytes(make_image(width, height, seed, fmt))
    return folder


@pytest.fixture(scope="module", params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(version, tmp_path_factory):
    return build_qwen2_vl_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{version}", version, seed=0)


@pytest.fixture(scope="module")
def reference(checkpoint, version):
    return QwenReference(checkpoint, version)


@pytest.fixture(scope="module")
def served(checkpoint, qwen_images, tmp_path_factory):
    with serving(
        checkpoint, qwen_images, tmp_path_factory.mktemp("logs"), ["--model-name", "tiny-qwen"]
    ) as served:
        yield served


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    model = ModelFactory.from_huggingface(str(checkpoint))
    pipe = Pipeline(model, model.tokenizer)
    yield pipe
    pipe.stop()


def chat(client, text, urls, **kwargs):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
        {"type": "text", "text": text}
    ]
    extra_body = {"return_token_ids": True, **kwargs.pop("extra_body", {})}
    kwargs = {"temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    return client.chat.completions.create(
        model="tiny-qwen", messages=[{"role": "user", "content": content}], extra_body=extra_body, **kwargs
    )


CASES = {
    "one-image": ("What is in the image?", ["a.png"]),
    "two-images": ("Compare the two pictures.", ["b.jpg", "wide.png"]),
    "tall-image": ("Describe this.", ["tall.png"]),
    "big-image": ("What is this?", ["big.png"]),
    "no-image": ("Describe a red car on the left.", []),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_stack_greedy_tokens_equal_reference(served, client, reference, qwen_images, case):
    _, http_base = served
    text, names = CASES[case]
    sources = [
        f"{http_base}/{n}" if i % 2 == 0 else data_url((qwen_images / n).read_bytes())
        for i, n in enumerate(names)
    ]
    response = chat(client, text, sources)
    ref_prompt, ref_new = reference.greedy(
        reference.chat_prompt(text, len(names)), [(qwen_images / n).read_bytes() for n in names]
    )
    assert response.model_extra["prompt_token_ids"] == ref_prompt
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == ref_new
    assert choice.message.content == reference.tokenizer.decode(ref_new, skip_special_tokens=True)
    assert response.usage.prompt_tokens == len(ref_prompt)


def test_reference_outputs_are_not_degenerate(reference, qwen_images):
    """The parity checks are only meaningful if greedy output depends on the input."""
    outputs = [
        reference.greedy(
            reference.chat_prompt(text, len(names)), [(qwen_images / n).read_bytes() for n in names]
        )[1]
        for text, names in CASES.values()
    ]
    assert len({tuple(o) for o in outputs}) == len(outputs)
    assert sum(len(set(o)) > 3 for o in outputs) >= len(outputs) - 1


@pytest.mark.parametrize(
    "names", [["a.png"], ["c.png", "tall.png"], []], ids=["one-image", "two-images", "no-image"]
)
@pytest.mark.parametrize("tag", ["<img/>", "<image>", "<|vision_start|><|image_pad|><|vision_end|>"])
def test_pipeline_greedy_equals_reference(pipeline, reference, qwen_images, names, tag):
    template = "<|im_start|>user\n{}What is this?<|im_end|>\n<|im_start|>assistant\n"
    prompt = template.format("".join(f"Picture {i + 1}: {tag}\n" for i in range(len(names))))
    responses = list(
        pipeline(
            prompt,
            urls=[str(qwen_images / n) for n in names],
            generate_config={"top_k": 1, "max_new_tokens": 12},
        )
    )
    ref_prompt = template.format(
        "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>\n" for i in range(len(names)))
    )
    _, ref_new = reference.greedy(ref_prompt, [(qwen_images / n).read_bytes() for n in names], 12)
    assert responses[-1].finished == [True]
    assert responses[-1].token_ids[0] == ref_new
    assert responses[-1].batch_response[0] == reference.tokenizer.decode(ref_new, skip_special_tokens=True)


def _image_tokens(ids: list[int], reference) -> int:
    return sum(1 for t in ids if t == reference.pad)


def _expected_tokens(reference, data: bytes, max_pixels: int | None = None) -> int:
    """N_i of one image as the HF image processor computes it."""
    size = dict(reference.image_processor.size)
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return int(reference.image_processor(images=[image], size=size)["image_grid_thw"][0].prod()) // 4


def test_per_request_max_pixels_changes_the_image_tokens(served, client, reference, qwen_images):
    stack, http_base = served
    url = f"{http_base}/big.png"
    default = chat(client, "What is this?", [url])
    small = chat(
        client, "What is this?", [url], extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}}
    )
    big = (qwen_images / "big.png").read_bytes()
    assert _image_tokens(default.model_extra["prompt_token_ids"], reference) == _expected_tokens(
        reference, big
    )
    small_tokens = _expected_tokens(reference, big, 28 * 28 * 4)
    assert _image_tokens(small.model_extra["prompt_token_ids"], reference) == small_tokens
    assert small_tokens < _expected_tokens(reference, big)
    ref_prompt, ref_new = reference.greedy(
        reference.chat_prompt("What is this?", 1),
        [(qwen_images / "big.png").read_bytes()],
        max_pixels=28 * 28 * 4,
    )
    assert small.model_extra["prompt_token_ids"] == ref_prompt
    assert small.choices[0].model_extra["token_ids"] == ref_new

    # The cache keeps both variants apart: asking again gives each its own answer, from the cache.
    # exported from the first cache hit on
    hits = stack.vision_metric('mmserve_vision_images_total{outcome="cached"}', absent=0.0)
    again = chat(
        client, "What is this?", [url], extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}}
    )
    assert again.model_extra["prompt_token_ids"] == small.model_extra["prompt_token_ids"]
    assert (
        chat(client, "What is this?", [url]).model_extra["prompt_token_ids"]
        == default.model_extra["prompt_token_ids"]
    )
    assert stack.vision_metric('mmserve_vision_images_total{outcome="cached"}') == hits + 2

    # Bad values are a 400, not a crash.
    for kwargs, needle in [
        ({"max_pixels": 0}, "max_pixels"),
        ({"min_pixels": 28 * 28 * 10, "max_pixels": 28 * 28 * 4}, "larger than max_pixels"),
        ({"bogus": 1}, "bogus"),
        # A request may narrow the server's bounds but never widen them (memory of the resize/forward).
        ({"min_pixels": 10**10, "max_pixels": 10**12}, "above this server's max_pixels"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, "What is this?", [url], extra_body={"mm_processor_kwargs": kwargs})
        assert needle in str(info.value)


def test_pipeline_pixels_in_generate_config(pipeline, reference, qwen_images):
    prompt = "<|im_start|>user\n<img/>Hi<|im_end|>\n<|im_start|>assistant\n"
    big = (qwen_images / "big.png").read_bytes()
    text_tokens = len(reference.tokenizer(pipeline.core.prompt.normalize_raw(prompt))["input_ids"]) - 1
    for config, max_pixels in [
        ({}, None),
        ({"max_pixels": 28 * 28 * 6}, 28 * 28 * 6),
        ({"mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}}, 28 * 28 * 4),
    ]:
        generate_config = {"top_k": 1, "max_new_tokens": 8, **config}
        last = list(pipeline(prompt, urls=[str(qwen_images / "big.png")], generate_config=generate_config))[
            -1
        ]
        assert last.usage[0].prompt_tokens == text_tokens + _expected_tokens(reference, big, max_pixels)
    with pytest.raises(ValueError, match="mm_processor_kwargs"):
        pipeline(
            prompt, urls=[str(qwen_images / "big.png")], generate_config={"mm_processor_kwargs": {"size": 3}}
        )


def test_prompt_syntax(served, reference, qwen_images):
    stack, http_base = served
    url = f"{http_base}/a.png"

    def complete(prompt, urls):
        return httpx.post(
            stack.base_url + "/v1/completions",
            json={
                "prompt": prompt,
                "urls": urls,
                "max_tokens": 4,
                "temperature": 0,
                "return_token_ids": True,
            },
            timeout=60,
        )

    # Count mismatch: a 400 naming both numbers.
    r = complete("<img/> and <image>", [url])
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "2 image tags" in message and "1 image was given" in message
    r = complete("No image here", [url])
    assert r.status_code == 400 and "0 image tags" in r.json()["error"]["message"]

    # `<img/>` and `<image>` are placeholders for the full vision block.
    answers = [complete(f"Picture 1: {tag}\nWhat is this?", [url]).json() for tag in ("<img/>", "<image>")]
    explicit = complete("Picture 1: <|vision_start|><|image_pad|><|vision_end|>\nWhat is this?", [url]).json()
    for answer in answers:
        assert answer["prompt_token_ids"] == explicit["prompt_token_ids"]
        assert answer["choices"][0]["token_ids"] == explicit["choices"][0]["token_ids"]
    ids = explicit["prompt_token_ids"]
    start = reference.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    end = reference.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert ids[ids.index(start) + 1 : ids.index(end)] == [reference.pad] * _image_tokens(ids, reference)

    # Chat text that merely mentions <image> is text, not a placeholder.
    response = httpx.post(
        stack.base_url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "what does <image> mean?"}],
            "max_tokens": 4,
            "return_token_ids": True,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert _image_tokens(response.json()["prompt_token_ids"], reference) == 0


def test_concurrent_requests_each_equal_their_sequential_answer(served, client):
    """Positions are per request (no rope state on the model): interleaved sequences do not mix."""
    from concurrent.futures import ThreadPoolExecutor

    _, http_base = served
    jobs = [(text, [f"{http_base}/{n}" for n in names]) for text, names in CASES.values()]
    sequential = [chat(client, *job).choices[0].model_extra["token_ids"] for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: chat(client, *job).choices[0].model_extra["token_ids"], jobs))
    assert concurrent == sequential
