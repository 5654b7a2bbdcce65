"""Qwen2-VL / Qwen2.5-VL language half: the text decoder + lm_head, with M-RoPE (3-D) positions.

The positions are computed here from the prompt ids, the image spans and each image's grid, once per
sequence, and kept on the sequence; nothing about a request is stored on the model object (HF's
`Qwen2VLModel.rope_deltas` is instance state, unsafe with concurrent requests). Qwen2.5-VL's text
model is the same decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoConfig

from llm_service.models.base import LanguageModel, checkpoint_eos
from llm_service.models.decoder import DecoderConfig
from mmserve.checkpoint import first_prefix_present, load_weights
from mmserve.errors import InvalidInputError
from mmserve.wire import GenerateRequest, ImageSpan


def mrope_positions(num_tokens: int, spans: Sequence[ImageSpan], merge: int) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) M-RoPE positions of a prompt and its rope delta (transformers' get_rope_index).

    Text tokens get p, p, p. An image span starting at s, with LLM grid (t, h/merge, w/merge), gets
    t = s + frame, h = s + row, w = s + col (raster order); the next text token starts at
    s + max(t, h/merge, w/merge). A decode step at absolute index i uses i + delta on all axes.
    """
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = 0  # next token index
    next_pos = 0  # position of the next text token
    for span in spans:
        text = span.offset - cursor
        positions[:, cursor : span.offset] = torch.arange(next_pos, next_pos + text)
        start = next_pos + text
        t, h, w = span.grid_thw[0], span.grid_thw[1] // merge, span.grid_thw[2] // merge
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        ).reshape(3, -1)
        positions[:, span.offset : span.offset + span.length] = grid + start
        cursor = span.offset + span.length
        next_pos = start + max(t, h, w)
    positions[:, cursor:] = torch.arange(next_pos, next_pos + num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


class Qwen2VLLanguageModel(LanguageModel):
    """The text decoder + lm_head, with positions from the prompt's images (M-RoPE)."""

    family = "qwen2_vl"
    position_dims = 3

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        config = AutoConfig.from_pretrained(checkpoint)
        text_config = config.get_text_config()
        prefix = first_prefix_present(checkpoint, ["model.language_model.", "model."])
        if prefix == "model.language_model.":
            rename = {prefix: "", "lm_head.": "lm_head."}
        else:  # Hub layout: model.{embed_tokens,layers,norm}.* next to visual.*
            rename = {f"model.{name}.": f"{name}." for name in ("embed_tokens", "layers", "norm")}
            rename["lm_head."] = "lm_head."
        # Flat (Hub) and nested configs alike: transformers keeps the flag on the top-level config.
        tied = bool(config.tie_word_embeddings)
        self._load(
            DecoderConfig.from_hf(text_config),
            load_weights(checkpoint, rename),
            f"{checkpoint}: language model ({prefix}*, lm_head.*)",
            device,
            dtype,
            image_token_id=int(config.image_token_id),
            eos_token_ids=checkpoint_eos(checkpoint, text_config.eos_token_id),
            tie_word_embeddings=tied,
        )
        self.merge = int(config.vision_config.spatial_merge_size)

    def validate_request(self, request: GenerateRequest) -> None:
        """Every image span needs its grid, and the grid must account for the span's length."""
        for i, span in enumerate(request.images):
            if len(span.grid_thw) != 3:
                raise InvalidInputError(
                    f"image span {i} has grid_thw {list(span.grid_thw)}; [t, h, w] is required"
                )
            t, h, w = span.grid_thw
            if min(t, h, w) < 1 or h % self.merge or w % self.merge:
                raise InvalidInputError(f"image span {i}: invalid grid_thw {list(span.grid_thw)}")
            if t * h * w // self.merge**2 != span.length:
                raise InvalidInputError(
                    f"image span {i}: grid_thw {list(span.grid_thw)} gives {t * h * w // self.merge**2} "
                    f"tokens but the span has {span.length}"
                )

    def positions(self, seq, start: int, end: int) -> torch.Tensor:
        """(3, end - start) M-RoPE positions: the prompt's from its images, then index + rope delta.

        The prompt's positions are computed once per sequence and kept on it (`seq.model_state`),
        never on this shared object."""
        if seq.model_state is None:
            seq.model_state = mrope_positions(seq.num_prompt_tokens, seq.request.images, self.merge)
        prompt_positions, delta = seq.model_state
        prompt_end = min(end, seq.num_prompt_tokens)
        parts = []
        if start < prompt_end:
            parts.append(prompt_positions[:, start:prompt_end])
        if end > prompt_end:
            parts.append(torch.arange(max(start, prompt_end), end).expand(3, -1) + delta)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
