"""Build small random-weight Qwen2-VL / Qwen2.5-VL checkpoints offline (the tests' models).

Everything is created locally: a byte-level BPE tokenizer with Qwen's special tokens and a ChatML chat
template, a `Qwen2VLImageProcessorPil` with small pixel bounds, and random weights. No network access is
needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tools.checkpoints import decoder_sizes, save_random_model, train_byte_bpe, write_marker

# Qwen2-VL Instruct's template, reduced to images: a default system turn, typed content parts,
# `<|vision_start|><|image_pad|><|vision_end|>` per image.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Small pixel bounds: 4..16 merged tokens per image by default.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16


def build_tokenizer(vocab_size: int = 400):
    """A Qwen-style byte-level BPE tokenizer (no BOS) with the Qwen2-VL special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_bpe(vocab_size, SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tokenizer


# Tiny vision towers. Qwen2-VL: embed_dim is the ViT width, hidden_size the LLM's (the merger's output).
# Qwen2.5-VL: hidden_size is the ViT width, out_hidden_size the LLM's; window attention in block 0, full
# attention in block 1 (the last).
VISION_CONFIGS: dict[str, dict[str, object]] = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 32,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "num_heads": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    },
}


def _transformers_class(version: str, suffix: str):
    """Qwen2VL{suffix} or Qwen2_5_VL{suffix} of transformers."""
    import transformers

    return getattr(transformers, ("Qwen2VL" if version == "qwen2_vl" else "Qwen2_5_VL") + suffix)


def build_qwen2_vl_checkpoint(
    path: str | Path, version: str = "qwen2_vl", seed: int = 0, tie_word_embeddings: bool = False
) -> Path:
    """Write a random-weight Qwen2-VL (`version="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`) checkpoint."""
    from transformers import Qwen2VLImageProcessorPil

    if version not in VISION_CONFIGS:
        raise ValueError(f"version must be qwen2_vl or qwen2_5_vl, got {version!r}")
    vision_config = dict(VISION_CONFIGS[version])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _transformers_class(version, "Config")(
        vision_config=vision_config,
        text_config=dict(
            vocab_size=len(tokenizer),
            **decoder_sizes(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tie_word_embeddings,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    save_random_model(
        path,
        _transformers_class(version, "ForConditionalGeneration"),
        config,
        seed,
        wide=("embed_tokens", "lm_head"),
        tie=tie_word_embeddings,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}).save_pretrained(
        path
    )
    write_marker(path, seed, version=version)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", help="output folder")
    parser.add_argument("--version", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_qwen2_vl_checkpoint(args.path, args.version, args.seed))


if __name__ == "__main__":
    main()
