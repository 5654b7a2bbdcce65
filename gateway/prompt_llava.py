"""LLaVA (llava-hf) prompts: `<image>` per image, the chat template from the checkpoint or --chat-template."""

from __future__ import annotations

import logging

from transformers import AutoConfig, AutoTokenizer

from gateway.chat_template import NO_TEMPLATE_MESSAGE, ChatTemplate, load_chat_template
from mmserve.errors import CheckpointError, InvalidInputError
from mmserve.interfaces import PromptAdapter

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
