"""Streaming text: UTF-8-safe incremental detokenization, stop strings, and per-token data (logprobs)
released together with its text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, TokenizersBackend

T = TypeVar("T")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A byte-level token can end in the middle of a UTF-8 character; decoding it alone yields U+FFFD.
    Text is emitted only once it no longer ends in U+FFFD, and each delta is the difference between
    decoding a short window with and without the new tokens, so tokenizers that drop a leading
    space at the start of a decode give the same text as one full decode. The concatenation of all
    deltas, `finish()` included, equals `tokenizer.decode(all_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._backend = _plain_backend(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # what the tokenizer's decode calls, without its argument conversion
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """Whatever the full decode has beyond what was emitted (e.g. a trailing partial character)."""
        full = self._decode(self.ids)
        if not full.startswith(self.emitted):  # pragma: no cover - tokenizer-specific decode quirks
            raise RuntimeError("incremental decode diverged from the full decode")
        delta = full[len(self.emitted) :]
        self.emitted = full
        return delta


def _plain_backend(tokenizer) -> Tokenizer | None:
    """The Rust tokenizer behind a transformers fast tokenizer whose decoding is transformers' own: its
    `decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` is then exactly the
    backend's `decode(ids, skip_special_tokens=True)`, and the conversion of the arguments around it
    costs 3x the decode of the detokenizer's few-token window (twice a token). None for any other
    tokenizer (slow ones, Qwen-VL's tiktoken one, subclasses that change decoding)."""
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
    ):
        return tokenizer.backend_tokenizer
    return None


class StopStrings:
    """Cuts the text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.released = 0  # characters let through so far; once stopped, where the text was cut

    def feed(self, delta: str) -> str:
        """Text safe to emit now; sets `stopped` when a stop string was found (it is not emitted)."""
        if self.stopped:
            return ""
        if not self.stops:  # nothing to look for: the common case, a token at a time
            self.released += len(delta)
            return delta
        self._pending += delta
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
        else:
            keep = max(0, len(self._pending) - self._hold)
            out, self._pending = self._pending[:keep], self._pending[keep:]
        self.released += len(out)
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        self.released += len(out)
        return out


class HeldTokens(Generic[T]):
    """Per-token items (logprobs) held back until their token's text has passed the stop strings.

    Each item is added with its token's [start, end) character span in the completion text (the
    detokenizer's output). An item goes out once the released text reaches its end; after a stop
    string cut the text, items of tokens starting before the cut go out and the rest are dropped
    (best effort: a token straddling the cut is kept; a token whose bytes end mid-character has an
    empty span and goes out with the text before it).
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int, T]] = []  # (start, end, item), in token order

    def add(self, start: int, end: int, item: T) -> None:
        self._held.append((start, end, item))

    def release(self, released: int, stopped: bool = False, final: bool = False) -> list[T]:
        """Items whose text is out, given `released` characters out so far (StopStrings.released)."""
        if stopped:
            out = [item for start, _, item in self._held if start < released]
            self._held = []
            return out
        if final:
            out = [item for _, _, item in self._held]
            self._held = []
            return out
        ready = 0
        while ready < len(self._held) and self._held[ready][1] <= released:
            ready += 1
        out = [item for _, _, item in self._held[:ready]]
        del self._held[:ready]
        return out
