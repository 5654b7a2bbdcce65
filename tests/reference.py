"""The correctness reference: transformers' own LlavaForConditionalGeneration on the same checkpoint."""

from __future__ import annotations

import io

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


class LlavaReference:
    def __init__(self, checkpoint):
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def chat_prompt(self, text: str, num_images: int) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    @torch.inference_mode()
    def greedy(self, prompt: str, images: list[bytes], max_new_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids, new ids) of greedy `generate` on the HF processor's inputs."""
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        inputs = self.processor(text=prompt, images=pil or None, return_tensors="pt")
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        prompt_ids = inputs["input_ids"][0].tolist()
        return prompt_ids, out[0, len(prompt_ids) :].tolist()
