"""Prompt adapter for original-layout LLaVA checkpoints (haotian-liu/LLaVA).

Those checkpoints ship no chat template: chats are rendered in the vicuna_v1 conversation format of
the original code base. `<image>` marks each image (wrapped in `<im_start>`/`<im_end>` when the
checkpoint sets mm_use_im_start_end), and prompts are tokenized the way the original
`tokenizer_image_token` does: each text chunk between tags on its own, BOS kept only once.
"""

from __future__ import annotations

import re

from transformers import AutoTokenizer

from mmserve.errors import CheckpointError, InvalidInputError
from mmserve.interfaces import PromptAdapter
from mmserve.llava_original import IM_END, IM_START, IMAGE_TAG, OriginalLlavaConfig, image_placeholder_id

# llava/conversation.py, conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>").
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_ROLES = {"user": "USER", "assistant": "ASSISTANT"}


class LlavaOriginalPrompt(PromptAdapter):
    family = "llava_original"
    image_tag = IMAGE_TAG
    tag_aliases = ("<img/>",)

    def __init__(self, checkpoint: str, tokenizer_path: str, chat_template: str | None = None):
        if chat_template:
            raise CheckpointError(
                "--chat-template / CHAT_TEMPLATE is not supported for original-format LLaVA checkpoints: their "
                "chat format (vicuna_v1) is built in; unset it, or send raw prompts to /v1/completions"
            )
        self.mm = OriginalLlavaConfig.from_checkpoint(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.image_token_id = image_placeholder_id(self.tokenizer)
        self.sep2 = self.tokenizer.eos_token or "</s>"
        self._image_text = f"{IM_START}{IMAGE_TAG}{IM_END}" if self.mm.use_im_start_end else IMAGE_TAG

    def render_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
        """Messages in transformers' multimodal format ({"type": "image"} parts) -> vicuna_v1 prompt text
        (built in code: there is no template, so chat_template_kwargs have nothing to reach)."""
        system = VICUNA_V1_SYSTEM
        turns = []
        for message in messages:
            role, content = message["role"], message.get("content") or ""
            if isinstance(content, str):
                text, images = content, 0
            else:
                text = "\n".join(part["text"] for part in content if part.get("type") == "text")
                images = sum(1 for part in content if part.get("type") == "image")
            if role == "system":
                system = text
                continue
            if role not in _ROLES:
                raise InvalidInputError(
                    f"role {role!r} is not supported by this model (system, user, assistant)"
                )
            turns.append((role, (self._image_text + "\n") * images + text))
        prompt = system + " "
        for role, text in turns:
            prompt += f"{_ROLES[role]}: {text}" + (" " if role == "user" else self.sep2)
        return prompt + "ASSISTANT:"

    def normalize_raw(self, prompt: str) -> str:
        for alias in self.tag_aliases:
            prompt = prompt.replace(alias, IMAGE_TAG)
        if self.mm.use_im_start_end:  # as run_llava.py does for a bare <image>
            prompt = re.sub(
                rf"(?<!{re.escape(IM_START)}){re.escape(IMAGE_TAG)}(?!{re.escape(IM_END)})",
                self._image_text,
                prompt,
            )
        return prompt

    def tokenize(self, text: str) -> list[int]:
        """llava/mm_utils.py tokenizer_image_token, with an in-vocabulary placeholder id for each tag."""
        chunks = [list(self.tokenizer(chunk)["input_ids"]) for chunk in text.split(IMAGE_TAG)]
        if any(self.image_token_id in chunk for chunk in chunks):
            token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            raise InvalidInputError(
                f"the prompt text contains {token!r}, which this model reserves for images"
            )
        bos = self.tokenizer.bos_token_id
        offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
        ids: list[int] = chunks[0][:offset]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(self.image_token_id)
            ids.extend(chunk[offset:])
        return ids
