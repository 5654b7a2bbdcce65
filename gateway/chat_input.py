"""User text bound for the chat template: refused when it holds a special token, images split out."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from mmserve.errors import InvalidInputError


def json_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from json_strings(key)
            yield from json_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from json_strings(item)


class SpecialTokenGuard:
    """Chat text is user data: a special token typed in it (an image tag, `<|im_end|>`, `</s>`) would be
    tokenized as the real control token, so it is refused rather than obeyed."""

    def __init__(self, tokenizer):
        specials = set(tokenizer.all_special_tokens) | {
            token.content for token in tokenizer.added_tokens_decoder.values()
        }
        # Longest first, so that a token containing another is reported whole.
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True) if t)
        self._pattern = re.compile(pattern or r"(?!x)x")

    def check(self, text: str) -> None:
        found = self._pattern.search(text)
        if found:
            raise InvalidInputError(
                f"message text may not contain the special token {found.group()!r}; "
                "images go in image_url parts, roles in messages"
            )

    def template_messages(self, messages: list[dict]) -> tuple[list[dict], list[str]]:
        """OpenAI chat messages (content as typed parts) -> the prompt adapter's messages, with image
        parts as bare `{"type": "image"}`, and the image urls in prompt order; every text checked."""
        converted, urls = [], []
        for message in messages:
            content = message.get("content")
            if content is None or isinstance(content, str):
                self.check(content or "")
                converted.append({"role": message["role"], "content": content or ""})
                continue
            parts: list[dict] = []
            for part in content:
                if part["type"] == "text":
                    self.check(part["text"])
                    parts.append({"type": "text", "text": part["text"]})
                else:  # image_url, validated at the edge
                    parts.append({"type": "image"})
                    urls.append(part["url"])
            converted.append({"role": message["role"], "content": parts})
        return converted, urls

    def check_template_kwargs(self, kwargs: dict) -> None:
        """Their strings reach the template too (even as bos_token and the like): user data as well."""
        for text in json_strings(kwargs):
            self.check(text)
