"""Streaming text: UTF-8-safe incremental detokenization and stop strings."""

from __future__ import annotations


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

    def _decode(self, ids: list[int]) -> str:
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


class StopStrings:
    """Cuts the text at the first stop string, holding back a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now; sets `stopped` when a stop string was found (it is not emitted)."""
        if self.stopped:
            return ""
        self._pending += delta
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:keep], self._pending[keep:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
