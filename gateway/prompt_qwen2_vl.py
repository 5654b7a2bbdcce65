"""Qwen2-VL / Qwen2.5-VL prompts: ChatML from the checkpoint's tokenizer, `<|image_pad|>` per image."""

from __future__ import annotations

from gateway.prompt_llava import LlavaPrompt


class Qwen2VLPrompt(LlavaPrompt):
    """The chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image; the gateway
    expands each `<|image_pad|>` to the N_i rows the vision service returned for that image."""

    family = "qwen2_vl"
    image_tag = "<|image_pad|>"
    image_block = "<|vision_start|><|image_pad|><|vision_end|>"
    # A "string" chat template sees each image's block where its part was, texts run together: what
    # Qwen2-VL's own template writes for a user turn.
    chat_image_text = image_block
    chat_images_first = False
    chat_text_separator = ""
    # Accepted as image placeholders in raw prompts (Pipeline, /v1/completions).
    raw_placeholders = ("<img/>", "<image>")

    def normalize_raw(self, prompt: str) -> str:
        for alias in self.raw_placeholders:
            prompt = prompt.replace(alias, self.image_block)
        return prompt
