"""Qwen (v1) tokenizer without tiktoken or remote code.

`qwen.tiktoken` (one `base64(token_bytes) rank` per line) is converted to a Hugging Face `tokenizers`
byte-level BPE the way transformers' TikTokenConverter does it (merges recovered from the ranks,
`ignore_merges` so whole-word vocabulary entries win as in tiktoken), with Qwen's pre-tokenisation
regex, NFC normalisation and its 208 special tokens appended in Qwen's order. The result is wrapped as
a `PreTrainedTokenizerFast`, so the gateway's detokenizer works unchanged.

The conversion takes about a second; the converted tokenizer.json is cached in memory and under
$MMSERVE_HOME (never next to the checkpoint, which may be read-only).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from mmserve.errors import CheckpointError

log = logging.getLogger(__name__)

# tokenization_qwen.py's PAT_STR (single digits: \p{N}).
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
# In Qwen's order: ids 151643 ... 151859 for the 151,643-rank qwen.tiktoken.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    IMG_START,
    IMG_END,
    IMG_PAD,
)
TIKTOKEN_FILE = "qwen.tiktoken"


def load_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def convert(tiktoken_path: str | Path):
    """qwen.tiktoken -> a `tokenizers.Tokenizer` equal to tiktoken's Qwen encoding."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_ranks(tiktoken_path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{tiktoken_path}: ranks are not 0..{len(ranks) - 1}")
    byte_encoder = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    bpe = models.BPE(
        vocab,
        [(to_str(left), to_str(right)) for left, right, _ in merges],
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=True,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    first = len(ranks)
    for offset, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != first + offset:
            raise CheckpointError(f"{tiktoken_path}: special token {name} did not get id {first + offset}")
    return tok


def _cache_dir() -> Path:
    home = Path(os.environ.get("MMSERVE_HOME", Path.home() / ".cache" / "mmserve"))
    return home / "qwen-tokenizers"


@functools.lru_cache(maxsize=4)
def _tokenizer_json(digest: str, tiktoken_path: str) -> str:
    cached = _cache_dir() / f"{digest}.json"
    try:
        return cached.read_text()
    except OSError:
        pass
    text = convert(tiktoken_path).to_str()
    try:  # best effort: an unwritable home only costs the conversion again next start
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.replace(f.name, cached)
    except OSError as exc:
        log.warning("could not cache the converted Qwen tokenizer at %s: %s", cached, exc)
    return text


def find_tiktoken(checkpoint: str | Path) -> Path:
    path = Path(checkpoint) / TIKTOKEN_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no {TIKTOKEN_FILE} (Qwen-VL's tokenizer file)")
    return path


def load_qwen_tokenizer(checkpoint: str | Path):
    """The Qwen tokenizer of a checkpoint folder holding `qwen.tiktoken`, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = find_tiktoken(checkpoint)
    # The cache key covers the conversion recipe too: a changed regex or special-token list rebuilds.
    recipe = (PAT_STR + "\n".join(SPECIAL_TOKENS)).encode()
    digest = hashlib.sha256(path.read_bytes() + recipe).hexdigest()[:32]
    tok = Tokenizer.from_str(_tokenizer_json(digest, str(path)))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=8192,
    )
