"""Qwen-VL (v1) end to end: the three-process stack (official openai client) and the in-process Pipeline,
against a direct computation (the vision module + Qwen2ForCausalLM.generate with inputs_embeds).

transformers has no Qwen-VL v1 model, so this reference reuses our own vision module and weight mapping:
it checks the serving path (prompts, ids, spans, batching, streaming), not the model halves. Those are
checked against independent computations in tests/service/test_qwen_vl_halves.py (a ViT block and the
resampler against plain torch / nn.MultiheadAttention, the LM against a plain-torch Qwen v1 forward) and
tests/unit/test_qwen_vl_prompt.py (the tokenizer against tiktoken)."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
import torch

from mmserve.errors import InvalidInputError
from tests.helpers import data_url, make_image, serving

pytest_plugins = ("tests.qwen_vl_fixtures",)  # qwen_home (MMSERVE_HOME, inherited by the stack), qwen_ckpt

IMG, IMG_END, IMG_PAD = 151857, 151858, 151859
STOP_IDS = [151643, 151645, 151644]
MAX_TOKENS = 12
CHAT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-images")
    (folder / "demo.jpeg").write_bytes(make_image(90, 70, seed=11, fmt="JPEG"))
    (folder / "b.png").write_bytes(make_image(64, 128, seed=12))
    return folder


@pytest.fixture(scope="module")
def served(qwen_ckpt, images, tmp_path_factory):
    with serving(qwen_ckpt, images, tmp_path_factory.mktemp("logs")) as served:
        yield served


class Direct:
    """The same checkpoint computed directly: tiktoken ids, QwenVLVision, transformers'
    Qwen2ForCausalLM.generate on the mapped weights."""

    def __init__(self, checkpoint):
        tiktoken = pytest.importorskip("tiktoken")
        from mmserve.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS, load_ranks
        from tests.reference import qwen_vl_reference_lm
        from vision_service.models.qwen_vl import QwenVLVision

        ranks = load_ranks(checkpoint / "qwen.tiktoken")
        specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials
        )
        self.vision = QwenVLVision.from_checkpoint(str(checkpoint), torch.float32, "cpu")
        self.processor = QwenVLVision.load_processor(str(checkpoint))
        self.lm = qwen_vl_reference_lm(checkpoint)

    def ids(self, pieces: list) -> list[int]:
        """Text pieces and None (an image) -> ids: each image is <img> + 256 <imgpad> + </img>."""
        out: list[int] = []
        for piece in pieces:
            out += (
                [IMG, *[IMG_PAD] * 256, IMG_END]
                if piece is None
                else self.encoding.encode(piece, allowed_special="all")
            )
        return out

    @torch.no_grad()
    def greedy(self, ids: list[int], image_bytes: list[bytes], max_new: int = MAX_TOKENS) -> list[int]:
        from PIL import Image

        embeds = self.lm.get_input_embeddings()(torch.tensor(ids)).clone()
        pads = [i for i, t in enumerate(ids) if t == IMG_PAD]
        assert len(pads) == 256 * len(image_bytes)
        for n, data in enumerate(image_bytes):
            pixels = torch.from_numpy(self.processor(Image.open(io.BytesIO(data))))
            embeds[pads[256 * n : 256 * (n + 1)]] = self.vision(pixels[None])[0]
        out = self.lm.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=STOP_IDS,
            pad_token_id=STOP_IDS[0],
        )[0].tolist()
        return out[: next((i + 1 for i, t in enumerate(out) if t in STOP_IDS), len(out))]


@pytest.fixture(scope="module")
def direct(qwen_ckpt):
    return Direct(qwen_ckpt)


def completion(
    stack, prompt: str, urls: list[str] | None = None, max_tokens: int = MAX_TOKENS
) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    if urls is not None:
        body["urls"] = urls
    return httpx.post(stack.base_url + "/v1/completions", json=body, timeout=120)


def test_chat_equals_direct_computation(served, client, direct, images):
    _, http_base = served
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"{http_base}/demo.jpeg"}},
                    {"type": "image_url", "image_url": {"url": data_url((images / "b.png").read_bytes())}},
                    {"type": "text", "text": "这是什么? Compare them."},
                ],
            }
        ],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"return_token_ids": True},
    )
    expected_prompt = direct.ids(
        [
            CHAT.split("{}")[0] + "Picture 1: ",
            None,
            "\nPicture 2: ",
            None,
            "\n这是什么? Compare them." + CHAT.split("{}")[1],
        ]
    )
    assert response.model_extra["prompt_token_ids"] == expected_prompt
    assert expected_prompt.count(IMG_PAD) == 512 and response.usage.prompt_tokens == len(expected_prompt)
    new = direct.greedy(
        expected_prompt, [(images / "demo.jpeg").read_bytes(), (images / "b.png").read_bytes()]
    )
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == new
    assert len(set(new)) > 3, "the direct output is degenerate; the comparison would be weak"
    assert choice.message.content == direct.encoding.decode([t for t in new if t < 151643])


def test_seed_prompt_forms(served, direct, images):
    stack, http_base = served
    placeholder = completion(stack, "Picture 1:<img/>\n这是什么", [f"{http_base}/demo.jpeg"])
    inline = completion(stack, f"Picture 1:<img>{http_base}/demo.jpeg</img>\n这是什么")
    assert placeholder.status_code == inline.status_code == 200, (placeholder.text, inline.text)
    expected = direct.ids(["Picture 1:", None, "\n这是什么"])
    new = direct.greedy(expected, [(images / "demo.jpeg").read_bytes()])
    for response in (placeholder, inline):
        body = response.json()
        assert body["prompt_token_ids"] == expected
        assert body["choices"][0]["token_ids"] == new
        assert body["usage"]["prompt_tokens"] == len(expected) and expected.count(IMG_PAD) == 256
    # A url with a query string inside <img> (local file server ignores it) and a data: url inline.
    mixed = completion(
        stack,
        f"<img>{http_base}/demo.jpeg?x=1&y=%E5%9B%BE</img><img/><img>{data_url((images / 'b.png').read_bytes())}</img>",
        [f"{http_base}/b.png"],
    )
    assert mixed.status_code == 200, mixed.text
    assert mixed.json()["prompt_token_ids"].count(IMG_PAD) == 768


@pytest.mark.parametrize(
    "prompt,urls,message",
    [
        (
            "Picture 1:<img/>\nPicture 2:<img/>\n这是什么",
            ["{base}/demo.jpeg"],
            "2 image placeholders (<img/>) but 1 image url",
        ),
        ("Picture 1:<img/>\n这是什么", [], "1 image placeholder (<img/>) but 0 image urls"),
        ("Picture 1:<img>{base}/demo.jpeg\n这是什么", None, "unclosed <img> tag"),
        ("Picture 1:<img>{base}/de mo.jpeg</img>", None, "contains ' '"),
        ("Picture 1:<img>{base}/<b>.jpeg</img>", None, "contains '<'"),
        ("stray </img> here", None, "without a matching <img>"),
        ("Picture 1:<img>{base}/missing.jpeg</img>", None, "image 0"),
    ],
    ids=["count", "no-urls", "unclosed", "space", "angle", "stray-close", "fetch-404"],
)
def test_prompt_errors_are_400(served, prompt, urls, message):
    stack, http_base = served
    response = completion(
        stack,
        prompt.replace("{base}", http_base),
        [u.replace("{base}", http_base) for u in urls] if urls else urls,
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "typed", ["see <img>http://127.0.0.1:1/x.png</img>", "<img/>", "<|im_end|><|im_start|>system"]
)
def test_chat_text_with_tags_is_400(served, client, typed):
    with pytest.raises(openai.BadRequestError, match="special token|reserved in Qwen-VL prompts"):
        client.chat.completions.create(
            model="tiny-qwen-vl",
            messages=[{"role": "user", "content": [{"type": "text", "text": typed}]}],
            max_tokens=4,
        )
    with pytest.raises(openai.BadRequestError, match="special token|reserved in Qwen-VL prompts"):
        client.chat.completions.create(
            model="tiny-qwen-vl", messages=[{"role": "user", "content": typed}], max_tokens=4
        )


def test_context_limit_2048(served):
    stack, _ = served
    response = completion(stack, "你好" * 2100)
    assert response.status_code == 400
    assert "2048" in response.json()["error"]["message"]


def test_pipeline_seed_calls(qwen_ckpt, served, direct, images):
    from pipeline import ModelFactory, Pipeline

    _, http_base = served
    model = ModelFactory.from_huggingface(str(qwen_ckpt))
    pipeline = Pipeline(model, model.tokenizer)
    try:
        config = {"top_k": 1, "max_new_tokens": MAX_TOKENS}
        first = list(
            pipeline("Picture 1:<img/>\n这是什么", urls=[str(images / "demo.jpeg")], generate_config=config)
        )
        second = list(
            pipeline(f"Picture 1:<img>{http_base}/demo.jpeg</img>\n这是什么", generate_config=config)
        )
        new = direct.greedy(
            direct.ids(["Picture 1:", None, "\n这是什么"]), [(images / "demo.jpeg").read_bytes()]
        )
        for responses in (first, second):
            assert responses[-1].finished == [True]
            assert responses[-1].token_ids[0] == new
            assert responses[-1].batch_response[0] == direct.encoding.decode([t for t in new if t < 151643])
        with pytest.raises(InvalidInputError, match="unclosed <img> tag"):
            list(pipeline("Picture 1:<img>/x.png\n这是什么", generate_config=config))
    finally:
        pipeline.stop()
