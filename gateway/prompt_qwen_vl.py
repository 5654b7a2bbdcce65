"""Qwen-VL / Qwen-VL-Chat (v1) prompts: `<img>URL</img>` spans, `<img/>` placeholders, ChatML.

Raw prompts (Pipeline, /v1/completions) may carry images two ways, mixed freely:
- inline, `<img>URL</img>`: the url is taken out of the text and fetched under the media policy;
- `<img/>` placeholders, each taking the next of the urls passed with the request (the counts must match).
Either way the span becomes `<img>` + N x `<imgpad>` + `</img>`, N (256) from the vision service's
answer: `extract_images` leaves one `<imgpad>` per image and ServingCore expands it.

Chat messages are rendered in code with Qwen's `make_context` ChatML format (Qwen-VL-Chat ships no
chat template); each image part becomes `Picture N: <img>...</img>\\n`. Text typed by a user in a chat
message may not contain image tags or ChatML control tokens: that is a 400, never an image fetch.
"""

from __future__ import annotations

import re

from mmserve.errors import CheckpointError, InvalidInputError
from mmserve.interfaces import PromptAdapter
from mmserve.qwen_tokenizer import (
    IM_END,
    IM_START,
    IMG_END,
    IMG_PAD,
    IMG_START,
    load_qwen_tokenizer,
)

PLACEHOLDER = "<img/>"
DEFAULT_SYSTEM = "You are a helpful assistant."
# One image after extraction; the single <imgpad> is expanded to N pads by ServingCore.
_IMAGE_SPAN = IMG_START + IMG_PAD + IMG_END
_TAGS = re.compile(r"<img/>|<img>|</img>|<imgpad>")
# Control tokens a chat user may not type (<ref>/<box>/<quad> stay allowed: grounding prompts use them).
_CHAT_RESERVED = re.compile(
    r"<img/>|<img>|</img>|<imgpad>|<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|extra_\d+\|>"
)
MAX_URL_CHARS = 1 << 16  # data: urls included


def _check_url(url: str, index: int) -> str:
    url = url.strip()
    if not url:
        raise InvalidInputError(
            f"image {index}: empty <img></img> span (write <img>URL</img>, or <img/> with urls)"
        )
    if len(url) > MAX_URL_CHARS:
        raise InvalidInputError(
            f"image {index}: url inside <img>...</img> is longer than {MAX_URL_CHARS} characters"
        )
    bad = next((c for c in url if c.isspace() or c in "<>\"'`" or ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise InvalidInputError(
            f"image {index}: the url inside <img>...</img> contains {bad!r}; percent-encode it"
        )
    return url


def extract_images(text: str, urls: list[str]) -> tuple[str, list[str]]:
    """(prompt, urls passed separately) -> (prompt with one `<img><imgpad></img>` per image, urls in order).

    `<img>URL</img>` contributes its url; each `<img/>` takes the next passed url.
    """
    out: list[str] = []
    ordered: list[str] = []
    given = list(urls)
    placeholders = 0
    pos = 0
    for match in _TAGS.finditer(text):
        if match.start() < pos:  # inside an <img>...</img> span already consumed
            continue
        out.append(text[pos : match.start()])
        tag = match.group()
        if tag == PLACEHOLDER:
            if placeholders < len(given):
                ordered.append(given[placeholders])
            placeholders += 1
            pos = match.end()
        elif tag == IMG_START:
            end = text.find(IMG_END, match.end())
            if end < 0:
                raise InvalidInputError(
                    f"unclosed <img> tag at character {match.start()}: write <img>URL</img>"
                )
            inner = text[match.end() : end]
            if IMG_START in inner:
                raise InvalidInputError(
                    f"nested or unclosed <img> tag at character {match.start()}: write <img>URL</img>"
                )
            ordered.append(_check_url(inner, len(ordered)))
            pos = end + len(IMG_END)
        elif tag == IMG_END:
            raise InvalidInputError(f"</img> at character {match.start()} without a matching <img>")
        else:
            raise InvalidInputError(f"{IMG_PAD} is reserved; write <img>URL</img> or <img/> for an image")
        out.append(_IMAGE_SPAN)
    out.append(text[pos:])
    if placeholders != len(given):
        raise InvalidInputError(
            f"the prompt has {placeholders} image placeholder{'s' * (placeholders != 1)} ({PLACEHOLDER}) "
            f"but {len(given)} image url{' was' if len(given) == 1 else 's were'} given"
        )
    return "".join(out), ordered


class QwenVLPrompt(PromptAdapter):
    family = "qwen_vl"
    image_tag = "<img>URL</img> or <img/>"

    def __init__(self, checkpoint: str, tokenizer_path: str, chat_template: str | None = None):
        if chat_template:
            raise CheckpointError(
                "--chat-template / CHAT_TEMPLATE is not supported for Qwen-VL (v1): its chat format "
                "(make_context ChatML) is built in; unset it, or send raw prompts to /v1/completions"
            )
        self.tokenizer = load_qwen_tokenizer(tokenizer_path)
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(IMG_PAD))
        from mmserve.checkpoint import read_config

        start = (read_config(checkpoint).get("visual") or {}).get("image_start_id")
        if start is not None and int(start) != self.tokenizer.convert_tokens_to_ids(IMG_START):
            raise CheckpointError(
                f"{checkpoint}: config.json visual.image_start_id is {start}, the tokenizer's <img> is "
                f"{self.tokenizer.convert_tokens_to_ids(IMG_START)}"
            )

    # ---- chat ----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
        """ChatML as Qwen's make_context writes it; image parts become `Picture N: <img/>\\n` (built in
        code: there is no template, so chat_template_kwargs have nothing to reach)."""
        system = DEFAULT_SYSTEM
        if messages and messages[0]["role"] == "system":
            system = self._content(messages[0], 0, None)
            messages = messages[1:]
        text = f"{IM_START}system\n{system}{IM_END}"
        pictures = [0]
        for i, message in enumerate(messages):
            role = message["role"]
            if role not in ("user", "assistant", "system"):
                raise InvalidInputError(f"message {i}: role {role!r} is not supported by Qwen-VL")
            text += f"\n{IM_START}{role}\n{self._content(message, i, pictures)}{IM_END}"
        return text + f"\n{IM_START}assistant\n"

    @staticmethod
    def _content(message: dict, index: int, pictures: list[int] | None) -> str:
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        out = []
        for part in parts:
            if part["type"] == "text":
                found = _CHAT_RESERVED.search(part["text"])
                if found:
                    raise InvalidInputError(
                        f"message {index}: text contains {found.group()!r}, which is reserved in Qwen-VL "
                        f"prompts; send images as image_url parts"
                    )
                out.append(part["text"])
            else:
                if pictures is None:
                    raise InvalidInputError(f"message {index}: a system message cannot hold images")
                pictures[0] += 1
                out.append(f"Picture {pictures[0]}: {PLACEHOLDER}\n")
        return "".join(out)

    # ---- raw prompts -----------------------------------------------------------------------------

    def normalize_raw(self, prompt: str) -> str:
        return prompt

    def extract_images(self, text: str, urls: list[str]) -> tuple[str, list[str]]:
        return extract_images(text, urls)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
