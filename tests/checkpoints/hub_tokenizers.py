"""Tokenizer files of the Hub builders: Qwen2 tokenizer.json from the real qwen.tiktoken ranks, a tiny
Llama-style sentencepiece model and its tokenizer.json."""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.checkpoints.qwen_vl import dashscope_tiktoken

# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    home = Path(os.environ.get("MMSERVE_HOME", Path.home() / ".cache" / "mmserve"))
    return home / "qwen-tokenizers"


@functools.lru_cache(maxsize=1)
def _qwen_bpe_json() -> str:
    """qwen.tiktoken as a `tokenizers` JSON with an empty `added_tokens` list.

    The BPE comes from mmserve.qwen_tokenizer (the Qwen-VL v1 conversion, itself cached on disk); its v1
    special tokens (<|extra_N|>, <img> ...) are dropped here. Qwen2's vocabulary is the same 151,643
    byte-level ranks, and its pre-tokenizer regex (transformers' qwen2 PRETOKENIZE_REGEX) is character
    for character Qwen v1's PAT_STR: checked here. Differences from the real Qwen2 tokenizer.json:
    `ignore_merges` true (tiktoken semantics; the same ids) and no ByteLevel post-processor (offsets only).
    Cached under $MMSERVE_HOME/qwen-tokenizers next to the gateway's cache (the conversion takes ~10 s).
    """
    import hashlib
    import tempfile

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from mmserve.qwen_tokenizer import PAT_STR, load_qwen_tokenizer

    if PRETOKENIZE_REGEX != PAT_STR:  # pragma: no cover - would need Qwen2's own regex here
        raise AssertionError("Qwen2's pre-tokenizer regex differs from Qwen v1's PAT_STR")
    tiktoken = dashscope_tiktoken()
    digest = hashlib.sha256(tiktoken.read_bytes() + PAT_STR.encode() + b"qwen2-base-1").hexdigest()[:32]
    cached = _cache_dir() / f"qwen2-base-{digest}.json"
    try:
        return cached.read_text(encoding="utf-8")
    except OSError:
        pass
    data = json.loads(load_qwen_tokenizer(tiktoken.parent).backend_tokenizer.to_str())
    data["added_tokens"] = []
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=cached.parent, delete=False, suffix=".tmp", encoding="utf-8"
        ) as f:
            f.write(text)
        os.replace(f.name, cached)
    except OSError:
        pass
    return text


def qwen2_tokenizer_json(tokenizer_config: Mapping[str, Any]) -> str:
    """tokenizer.json for Qwen2(.5)-VL: the real qwen.tiktoken BPE plus the real `added_tokens_decoder`
    (ids 151643..), special flags as in tokenizer_config.json."""
    base = _qwen_bpe_json()
    added = []
    for key, tok in sorted(tokenizer_config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])):
        if int(key) < 151643:
            raise ValueError(f"added token {tok['content']} id {key} collides with the BPE ranks")
        added.append(
            {
                "id": int(key),
                "content": tok["content"],
                "single_word": tok.get("single_word", False),
                "lstrip": tok.get("lstrip", False),
                "rstrip": tok.get("rstrip", False),
                "normalized": tok.get("normalized", False),
                "special": tok.get("special", True),
            }
        )
    empty = '"added_tokens":[]'
    if empty not in base[:200]:
        raise AssertionError("unexpected tokenizer JSON layout")
    return base.replace(empty, '"added_tokens":' + json.dumps(added, ensure_ascii=False), 1)


def _corpus() -> list[str]:
    from tools.checkpoints import corpus

    return corpus() + [
        "[INST] What is shown in this picture? [/INST]",
        "A chat between a curious human and an artificial intelligence assistant.",
        "USER: Describe the image in detail. ASSISTANT: The image shows a small cat.",
    ]


@functools.lru_cache(maxsize=2)
def train_sentencepiece(vocab_size: int = 600) -> bytes:
    """A tiny Llama-style sentencepiece BPE model (serialized): unk 0, bos 1, eos 2, 256 byte-fallback
    pieces, add_dummy_prefix, identity normalization, split digits, as Llama's tokenizer.model."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() * 3),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buf.getvalue()


def llama_tokenizer_json(pad_to: int = 32000, added: Mapping[str, int] | None = None) -> str:
    """tokenizer.json of a Llama-style (Metaspace, byte-fallback BPE) tokenizer: the tiny sentencepiece
    model converted the way transformers converts Llama's, its vocabulary padded with never-produced
    filler entries `<filler_N>` up to `pad_to`, then `added` special tokens at their real ids."""
    import tempfile

    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tokenizer.model"
        model.write_bytes(train_sentencepiece())
        extracted = SentencePieceExtractor(str(model)).extract(None)
    vocab, merges = extracted["vocab"], extracted["merges"]
    vocab = dict(vocab)
    for i in range(len(vocab), pad_to):
        vocab[f"<filler_{i}>"] = i
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    backend = tok.backend_tokenizer
    data = json.loads(backend.to_str())
    specials = [{"id": i, "content": c} for c, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))]
    specials += [{"id": i, "content": c} for c, i in (added or {}).items()]
    if sorted((added or {}).values()) != list(range(pad_to, pad_to + len(added or {}))):
        raise ValueError(f"added tokens {added} must take the ids right after the padded vocabulary")
    # Added tokens live only in `added_tokens` (ids past the model vocabulary), as in Llama's file.
    data["added_tokens"] = [
        {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True, **s}
        for s in specials
    ]
    return json.dumps(data, ensure_ascii=False)
