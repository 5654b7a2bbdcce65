"""Qwen-VL (v1) prompts: the tokenizer vs tiktoken, the prompt adapter's parsing, rendering and errors."""

from __future__ import annotations

import unicodedata

import pytest

from mmserve.errors import InvalidInputError

pytest_plugins = ("tests.qwen_vl_fixtures",)  # qwen_home, qwen_ckpt, prompt

IMG, IMG_END, IMG_PAD = 151857, 151858, 151859


@pytest.fixture(scope="module")
def tiktoken_encoding(qwen_ckpt):
    tiktoken = pytest.importorskip("tiktoken")
    from mmserve.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS, load_ranks

    ranks = load_ranks(qwen_ckpt / "qwen.tiktoken")
    return tiktoken.Encoding(
        "qwen",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)},
    )


# ---- tokenizer -----------------------------------------------------------------------------------

TEXTS = [
    "你好世界，这是什么？图片里有一只猫。",
    "😀🐱🚗 emoji 👨‍👩‍👧 and flags 🇨🇳🇺🇸",
    "naïve café déjà vu (decomposed: cafe\u0301 nai\u0308ve) Ａｂｃ１２３",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Picture 1: <img>https://example.com/a b/你好.jpeg?x=1&y=2</img>\n这是什么<|im_end|>\n<|im_start|>assistant\n",
    "<ref>the cat</ref><box>(12,34),(56,78)</box><quad>1</quad> <|extra_0|><|extra_204|><|endoftext|>",
    "numbers 1234567890 3.14159 and   spaces\t\ttabs\r\n\r\n  trailing   ",
    "def f(x):\n    return x**2  # コメント 한국어 العربية русский",
]


def test_special_token_ids(prompt):
    from mmserve.qwen_tokenizer import SPECIAL_TOKENS

    tok = prompt.tokenizer
    assert len(SPECIAL_TOKENS) == 217 and len(tok) == 151860
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646}
    expected |= {"<|extra_204|>": 151850, "<ref>": 151851, "</quad>": 151856}
    expected |= {"<img>": IMG, "</img>": IMG_END, "<imgpad>": IMG_PAD}
    for name, token_id in expected.items():
        assert tok.convert_tokens_to_ids(name) == token_id
        assert prompt.tokenize(name) == [token_id]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_equals_tiktoken(prompt, tiktoken_encoding, text):
    ours = prompt.tokenize(text)
    assert ours == tiktoken_encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert prompt.tokenizer.decode(ours) == unicodedata.normalize("NFC", text)


def test_tokenizer_is_cached_outside_the_checkpoint(qwen_ckpt, qwen_home, prompt):
    from mmserve.qwen_tokenizer import load_qwen_tokenizer

    cached = list((qwen_home / "qwen-tokenizers").glob("*.json"))
    assert len(cached) == 1 and cached[0].stat().st_size > 5_000_000
    assert sorted(p.name for p in qwen_ckpt.iterdir()) == [
        "config.json",
        "mmserve_demo.json",
        "model.safetensors",
        "qwen.tiktoken",
        "tokenizer_config.json",
    ]
    assert load_qwen_tokenizer(qwen_ckpt)("你好<img>")["input_ids"] == prompt.tokenize("你好<img>")


# ---- prompts -------------------------------------------------------------------------------------


def test_family_detection(qwen_ckpt):
    from mmserve.families import adapter, detect_family

    assert detect_family(qwen_ckpt) == "qwen_vl" == detect_family(qwen_ckpt, "qwen_vl")
    assert adapter("qwen_vl", "prompt").family == adapter("qwen_vl", "language").family == "qwen_vl"


def test_extract_images_forms():
    from gateway.prompt_qwen_vl import extract_images

    span = "<img><imgpad></img>"
    assert extract_images("Picture 1:<img/>\n这是什么", ["u"]) == (f"Picture 1:{span}\n这是什么", ["u"])
    url = "https://h.example/a%20b/图.jpeg?x=1&y=2#frag"
    assert extract_images(f"Picture 1:<img> {url} </img>\n这是什么", []) == (
        f"Picture 1:{span}\n这是什么",
        [url],
    )
    # Mixed: inline urls and placeholders keep prompt order.
    text, urls = extract_images("<img/> <img>data:image/png;base64,AAA=</img> <img/>", ["a", "b"])
    assert (text, urls) == (f"{span} {span} {span}", ["a", "data:image/png;base64,AAA=", "b"])
    assert extract_images("no images <ref>x</ref>", []) == ("no images <ref>x</ref>", [])


@pytest.mark.parametrize(
    "text,urls,message",
    [
        ("<img/><img/>", ["a"], "2 image placeholders (<img/>) but 1 image url was given"),
        ("<img/>", [], "1 image placeholder (<img/>) but 0 image urls were given"),
        ("<img>http://a/b.png</img>", ["extra"], "0 image placeholders (<img/>) but 1 image url was given"),
        ("Picture 1: <img>http://a/b.png\n这是什么", [], "unclosed <img> tag at character 11"),
        ("<img>http://a/<img>b.png</img>", [], "nested or unclosed <img>"),
        ("x </img> y", [], "</img> at character 2 without a matching <img>"),
        ("<img></img>", [], "empty <img></img>"),
        ("<img>http://a/b c.png</img>", [], "contains ' '"),
        ('<img>http://a/b".png</img>', [], "contains '\"'"),
        ("<img>http://a/b\x00.png</img>", [], "contains '\\x00'"),
        ("<imgpad>", [], "<imgpad> is reserved"),
    ],
)
def test_extract_images_errors(text, urls, message):
    from gateway.prompt_qwen_vl import extract_images

    with pytest.raises(InvalidInputError) as info:
        extract_images(text, urls)
    assert message in str(info.value)
    assert info.value.http_status == 400


def test_chat_rendering_is_make_context(prompt):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这是什么"}]},
        {"role": "assistant", "content": "一只猫"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "和"}, {"type": "image"}, {"type": "text", "text": "比较"}],
        },
    ]
    assert prompt.render_chat(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img/>\n这是什么<|im_end|>\n"
        "<|im_start|>assistant\n一只猫<|im_end|>\n"
        "<|im_start|>user\n和Picture 2: <img/>\n比较<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert prompt.render_chat(system).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi"
    )


@pytest.mark.parametrize(
    "typed",
    ["look <img>http://127.0.0.1/x.png</img>", "a <img/> b", "<imgpad>", "x</img>", "<|im_start|>system"],
)
def test_chat_text_cannot_smuggle_tags(prompt, typed):
    with pytest.raises(InvalidInputError, match="reserved in Qwen-VL prompts"):
        prompt.render_chat([{"role": "user", "content": [{"type": "text", "text": typed}]}])


def test_prompt_adapter_tokenizes_one_pad_per_image(prompt, tiktoken_encoding):
    text, urls = prompt.extract_images("Picture 1:<img>https://x/demo.jpeg</img>\n这是什么", [])
    ids = prompt.tokenize(text)
    assert urls == ["https://x/demo.jpeg"]
    assert ids == tiktoken_encoding.encode("Picture 1:") + [IMG, IMG_PAD, IMG_END] + tiktoken_encoding.encode(
        "\n这是什么"
    )
