"""Response bodies of chat and text completions, whole or as server-sent events, in OpenAI's shapes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.serving import TextDelta, TokenLogprob
from mmserve.wire import Usage

DONE = "data: [DONE]\n\n"
_to_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), built once


def sse(payload: dict) -> str:
    return f"data: {_to_json(payload)}\n\n"


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def total_usage(usages: list[Usage]) -> Usage:
    """The usage of a request's choices together: the prompt counted once (its cached tokens as the
    choice that got the fewest from the cache: the others reuse what that one computed), the completion
    tokens of every choice."""
    return Usage(
        usages[0].prompt_tokens,
        sum(u.completion_tokens for u in usages),
        min(u.cached_tokens for u in usages),
    )


@dataclass
class FinishedChoice:
    """One choice of a whole (not streamed) response."""

    text: str
    ids: list[int]
    last: TextDelta  # its finishing delta: finish_reason and usage
    logprobs: list[TokenLogprob] | None


def finite_logprob(value: float) -> float:
    """JSON has no -inf (a token the model rules out): vLLM's stand-in."""
    return value if math.isfinite(value) else -9999.0


def token_json(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": finite_logprob(logprob), "bytes": list(token.encode("utf-8"))}


class Render:
    """Builds response bodies of one route; subclasses say how a choice and a delta look."""

    object_full = object_chunk = ""

    def __init__(self, request_id: str, model: str):
        self.request_id, self.model, self.created = request_id, model, int(time.time())
        # Every chunk's event up to its choice: sse(envelope(object_chunk, [choice])) is this, the
        # choice's JSON, then "]}\n\n" (written once, not once a token).
        self._chunk_head = sse(self.envelope(self.object_chunk, []))[: -len("]}\n\n")]

    def full_choice(self, text: str) -> dict:
        raise NotImplementedError

    def stream_head(self) -> dict | None:
        raise NotImplementedError

    def chunk_choice(self, text: str) -> dict:
        raise NotImplementedError

    def logprobs_json(self, entries: list[TokenLogprob]) -> dict:
        raise NotImplementedError

    def choice(
        self, body: dict, logprobs: list[TokenLogprob] | None, finish_reason: str | None, index: int = 0
    ) -> dict:
        """A choice: its index, its route-specific `body`, then `logprobs` (null when not requested),
        finish_reason."""
        lp = None if logprobs is None else self.logprobs_json(logprobs)
        return {"index": index, **body, "logprobs": lp, "finish_reason": finish_reason}

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        head = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **extra}

    def full(self, choices: list[FinishedChoice], prompt_ids: list[int], with_ids: bool) -> dict:
        """The response of a request whose choices (index order) have all finished."""
        bodies = []
        for index, c in enumerate(choices):
            body = self.choice(self.full_choice(c.text), c.logprobs, c.last.finish_reason, index)
            if with_ids:
                body["token_ids"] = c.ids
            bodies.append(body)
        usages = [c.last.usage for c in choices]
        assert all(u is not None for u in usages), "the last delta carries usage"
        extra: dict[str, Any] = {"usage": usage_json(total_usage(usages))}  # type: ignore[arg-type]
        if with_ids:
            extra["prompt_token_ids"] = prompt_ids
        return self.envelope(self.object_full, bodies, **extra)

    async def stream(
        self,
        first: TextDelta,
        rest: AsyncIterator[TextDelta],
        prompt_ids: list[int],
        include_usage: bool,
        with_ids: bool,
        choices: int = 1,
    ) -> AsyncGenerator[str, None]:
        """The events of a stream of `choices` choices (their deltas interleaved, each chunk naming its
        choice's index); MeteredStream turns an error into an error event and closes `rest`."""
        head = self.stream_head()
        if head is not None:  # every choice opens with its role, before any text (as vLLM)
            for index in range(choices):
                yield sse(self.envelope(self.object_chunk, [self.choice(head, None, None, index)]))
        delta: TextDelta | None = first
        usages: dict[int, Usage] = {}
        while delta is not None:
            choice = self.choice(
                self.chunk_choice(delta.text), delta.logprobs, delta.finish_reason, delta.index
            )
            if with_ids:
                choice["token_ids"] = delta.token_ids
            yield f"{self._chunk_head}{_to_json(choice)}]}}\n\n"
            if delta.usage is not None:
                usages[delta.index] = delta.usage
            delta = await anext(rest, None)
        if include_usage and len(usages) == choices:
            usage = total_usage([usages[i] for i in range(choices)])
            yield sse(self.envelope(self.object_chunk, [], usage=usage_json(usage)))
        yield DONE


class ChatRender(Render):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def full_choice(self, text):
        return {"message": {"role": "assistant", "content": text}}

    def stream_head(self):
        return {"delta": {"role": "assistant", "content": ""}}

    def chunk_choice(self, text):
        return {"delta": {"content": text} if text else {}}

    def logprobs_json(self, entries):
        """OpenAI chat's shape: per token its string, bytes, logprob and the top alternatives."""
        return {
            "content": [
                {**token_json(e.token, e.logprob), "top_logprobs": [token_json(t, v) for t, v in e.top]}
                for e in entries
            ]
        }


class TextRender(Render):
    object_full = object_chunk = "text_completion"

    def full_choice(self, text):
        return {"text": text}

    def stream_head(self):
        return None

    def chunk_choice(self, text):
        return {"text": text}

    def logprobs_json(self, entries):
        """Legacy completions' shape: parallel lists; each top_logprobs dict holds the alternatives and,
        as OpenAI documents, always the sampled token (so up to n + 1 entries; tokens whose strings
        coincide share one key, the likelier one's)."""
        top_logprobs = []
        for e in entries:
            top: dict[str, float] = {}
            for token, value in [*e.top, (e.token, e.logprob)]:
                top.setdefault(token, finite_logprob(value))
            top_logprobs.append(top)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [finite_logprob(e.logprob) for e in entries],
            "top_logprobs": top_logprobs,
            "text_offset": [e.text_offset for e in entries],
        }
