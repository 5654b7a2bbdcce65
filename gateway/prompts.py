"""Prompt adapters: chat templating, image tags and tokenization, one adapter per model family."""

from __future__ import annotations

import logging

from transformers import AutoTokenizer

from gateway.chat_template import NO_TEMPLATE_MESSAGE, ChatTemplate, load_chat_template
from mmserve.errors import CheckpointError, InvalidInputError
from mmserve.interfaces import PromptAdapter
from mmserve.wire import ImageFeatures, ImageSpan

log = logging.getLogger(__name__)


class LlavaPrompt(PromptAdapter):
    """LLaVA: `<image>` marks each image; the chat template comes from the checkpoint (or the
    --chat-template override), in either content format (gateway/chat_template.py)."""

    family = "llava"
    image_tag = "<image>"
    # Also accepted in raw prompts (Pipeline, /v1/completions), as the seed's examples write them.
    tag_aliases = ("<img/>",)
    # How a "string" chat template sees an image part: LLaVA's convention, every image's `<image>\n`
    # ahead of the message's text (what llava-hf's own template writes); texts joined by newlines.
    chat_image_text = "<image>\n"
    chat_images_first = True
    chat_text_separator = "\n"

    def __init__(self, checkpoint: str, tokenizer_path: str, chat_template: str | None = None):
        from transformers import AutoConfig

        # transformers' config class reads `image_token_index` (llava-hf) and `image_token_id` (Qwen2-VL)
        # alike, with the family's defaults for what a sparse config.json leaves out.
        config = AutoConfig.from_pretrained(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.image_token_id = int(config.image_token_id)
        if self.tokenizer.convert_tokens_to_ids(self.image_tag) != self.image_token_id:
            raise CheckpointError(
                f"{tokenizer_path}: tokenizer maps {self.image_tag!r} to "
                f"{self.tokenizer.convert_tokens_to_ids(self.image_tag)}, config.json says {self.image_token_id}"
            )
        self.chat_template = load_chat_template(checkpoint, self.tokenizer, chat_template)
        self.template = None
        if self.chat_template:
            self.template = ChatTemplate(
                self.chat_template, self.chat_image_text, self.chat_images_first, self.chat_text_separator
            )
            log.info("chat template: %s content", self.template.content_format)

    def render_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
        """Messages in transformers' multimodal format ({"type": "image"} parts) -> prompt text; for a
        template that reads string content, each image part becomes `chat_image_text`."""
        if self.template is None:
            raise InvalidInputError(NO_TEMPLATE_MESSAGE)
        return self.template.render(self.tokenizer, messages, chat_template_kwargs)

    def normalize_raw(self, prompt: str) -> str:
        for alias in self.tag_aliases:
            prompt = prompt.replace(alias, self.image_tag)
        return prompt

    def tokenize(self, text: str) -> list[int]:
        # Add BOS the way the HF processor does, unless the template already wrote it.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])


def expand_image_tokens(
    token_ids: list[int], image_token_id: int, features: list[ImageFeatures]
) -> tuple[list[int], list[ImageSpan]]:
    """Replace the i-th image token by features[i].num_tokens copies and record each span.

    N_i comes from the vision service's answer, so the prompt and the embeddings agree by construction.
    """
    tags = sum(1 for t in token_ids if t == image_token_id)
    if tags != len(features):
        raise InvalidInputError(f"the prompt has {tags} image tags but {len(features)} images were given")
    expanded: list[int] = []
    spans: list[ImageSpan] = []
    images = iter(features)
    for token in token_ids:
        if token != image_token_id:
            expanded.append(token)
            continue
        image = next(images)
        spans.append(
            ImageSpan(
                offset=len(expanded),
                embedding=image.embedding,
                content_hash=image.content_hash,
                grid_thw=image.grid_thw,
            )
        )
        expanded.extend([image_token_id] * image.num_tokens)
    return expanded, spans
