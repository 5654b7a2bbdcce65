"""Small random-weight checkpoints built offline: the one builder behind the `make run` demo, the tests'
checkpoints (tests/checkpoints/) and the benchmarks'.

Everything is created locally: a byte-level BPE tokenizer trained on a built-in corpus, a CLIP image
processor, a chat template and random weights (seeded, widened: see `widen_init`). No network access.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A llava-hf 1.5 style template. Like the real one it reads typed content parts only (a plain string
# content renders as nothing), so the tests exercise what real checkpoints do: per message
# "ROLE: ", then the message's images, then its text parts.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

_WORDS = (
    "the a an image picture photo of in on with and is are what where who how many colour color red green "
    "blue yellow black white cat dog bird car tree house sky sea mountain person people sitting standing "
    "running small large bright dark left right top bottom describe this that there here it shows shown "
    "question answer assistant user hello world model vision language token embedding"
).split()
_EXTRA = [
    "你好世界",
    "这是什么",
    "图片里有一只猫",
    "😀 🐱 🚗",
    "naïve café déjà vu",
    "12345 67890",
    "Hello, World!",
]


def corpus() -> list[str]:
    """The built-in text the tiny tokenizers are trained on (words, a few scripts, emoji, digits)."""
    lines = []
    for i, word in enumerate(_WORDS):
        tail = " ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(8))
        lines.append(f"{word.capitalize()} {tail}.")
        lines.append(f"What is in the {word}? {tail}!")
    return lines + _EXTRA * 5


def train_byte_bpe(vocab_size: int, special_tokens: list[str], unk_token: str | None = None):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the built-in corpus, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bars write to stdout, which `python -m tools.demo` keeps for the path
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 400):
    """A Llama-style (BOS-prefixing) byte-level BPE tokenizer with an `<image>` special token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_bpe(vocab_size, SPECIAL_TOKENS, unk_token="<unk>")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


@dataclass
class LlavaShape:
    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 400  # tokenizer vocabulary (trained on a small built-in corpus)
    model_vocab_size: int | None = None  # embedding rows, when larger than the tokenizer's (e.g. 32064)
    max_position_embeddings: int = 4096


# The benchmarks' anchor: LLaVA-1.5's shapes scaled down (CLIP ViT 336/14 -> 576 image tokens).
ANCHOR_SHAPE = LlavaShape(
    image_size=336,
    vision_hidden=256,
    vision_intermediate=1024,
    vision_layers=4,
    vision_heads=4,
    text_hidden=512,
    text_intermediate=1376,
    text_layers=4,
    text_heads=8,
    text_kv_heads=8,
    model_vocab_size=32064,
)

# The `make run` demo: LLaVA-1.5's token geometry (336px, patch 14 -> 576 image tokens), tiny widths.
DEMO_SHAPE = LlavaShape(
    image_size=336, vision_hidden=64, vision_intermediate=128, text_hidden=128, text_intermediate=256
)


def decoder_sizes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """A transformers decoder config's size keywords (LlamaConfig, Qwen2-VL's text_config, ...)."""
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    }


def tower_and_text_configs(shape: LlavaShape, tokenizer, image_size: int | None = None) -> dict:
    """The CLIP tower and Llama text configs of `shape`, as LlavaConfig / LlavaNextConfig keywords."""
    from transformers import CLIPVisionConfig, LlamaConfig

    return {
        "vision_config": CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=image_size or shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=shape.vision_hidden,
        ),
        "text_config": LlamaConfig(
            vocab_size=max(len(tokenizer), shape.model_vocab_size or 0),
            **decoder_sizes(
                shape.text_hidden,
                shape.text_intermediate,
                shape.text_layers,
                shape.text_heads,
                shape.text_kv_heads,
            ),
            max_position_embeddings=shape.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
    }


def widen_init(model, wide: tuple[str, ...] = ("embed", "lm_head"), generator=None) -> None:
    """Redraw the weights: N(0, 1) for parameters named by `wide` (and LLaVA-NeXT's image_newline),
    N(0, 0.2) for the other matrices.

    Default init leaves tiny random models emitting one token forever; wider weights make the greedy
    path depend on the input, which is what parity tests need."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = 1.0 if any(part in name for part in wide) else 0.2
            elif name.endswith("image_newline"):
                std = 1.0
            else:
                continue
            param.normal_(0.0, std, generator=generator)


def random_model(
    model_class, config, seed: int, wide: tuple[str, ...] = ("embed", "lm_head"), generator=None
):
    """`model_class(config)` in eval mode, torch seeded with `seed` first, its weights widened."""
    import torch

    torch.manual_seed(seed)  # before construction: that draws the biases and norms widen_init keeps
    model = model_class(config)
    widen_init(model, wide, generator)
    return model.eval()


def save_random_model(
    path: Path,
    model_class,
    config,
    seed: int,
    dtype: str = "float32",
    wide: tuple[str, ...] = ("embed", "lm_head"),
    tie: bool = False,
    **generation: int,
):
    """`random_model(model_class, config, seed, wide)` cast to `dtype`, saved at `path`; `generation`
    (pad_token_id=..., eos_token_id=...) goes into its generation_config."""
    import torch

    model = random_model(model_class, config, seed, wide)
    if tie:
        model.tie_weights()
    model.to(getattr(torch, dtype))
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(path)


def write_marker(path: Path, seed: int, **info) -> None:
    """mmserve_demo.json: how a random-weight checkpoint was built (the launcher's banner reads it)."""
    (path / "mmserve_demo.json").write_text(json.dumps({"seed": seed, **info}))


def build_llava_checkpoint(
    path: str | Path,
    shape: LlavaShape | None = None,
    seed: int = 0,
    dtype: str = "float32",
    grid_pinpoints: list[list[int]] | None = None,
) -> Path:
    """Write a random-weight llava-hf checkpoint with tokenizer and processor: a
    `LlavaForConditionalGeneration`, or with `grid_pinpoints` a `LlavaNextForConditionalGeneration`
    (anyres tiling over those resolutions, image_newline)."""
    import transformers

    shape = shape or LlavaShape()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size)
    side = shape.image_size
    sizes: dict = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    family, tiling = "Llava", dict[str, Any]()
    if grid_pinpoints is not None:
        family, tiling = "LlavaNext", {"image_grid_pinpoints": grid_pinpoints}
    config = getattr(transformers, f"{family}Config")(
        **tower_and_text_configs(shape, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(side // shape.patch_size) ** 2,
        **tiling,
    )
    model_class = getattr(transformers, f"{family}ForConditionalGeneration")
    save_random_model(path, model_class, config, seed, dtype, pad_token_id=tokenizer.pad_token_id)
    image_processor = (
        transformers.LlavaNextImageProcessorPil(**sizes, **tiling)
        if tiling
        else transformers.CLIPImageProcessorPil(**sizes)
    )
    processor = getattr(transformers, f"{family}Processor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    write_marker(path, seed, **asdict(shape))
    return path
