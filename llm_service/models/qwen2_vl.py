"""Qwen2-VL / Qwen2.5-VL language half: the text decoder + lm_head, with M-RoPE (3-D) positions.

The positions are computed here from the prompt ids, the image spans and each image's grid, for one
request at a time, and passed to the decoder explicitly; nothing about a request is stored on the
model object (HF's `Qwen2VLModel.rope_deltas` is instance state, unsafe with concurrent requests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoConfig

from llm_service.models.base import eos_list
from mmserve.checkpoint import first_prefix_present, load_strict, load_weights
from mmserve.errors import InvalidInputError
from mmserve.wire import GenerateRequest, ImageSpan


def _text_model_class(model_type: str):
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        return Qwen2_5_VLTextModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    return Qwen2VLTextModel


def mrope_positions(num_tokens: int, spans: Sequence[ImageSpan], merge: int) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) M-RoPE positions of a prompt and its rope delta (models.md section 3).

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


class Qwen2VLLanguageModel:
    """Owns the text decoder + lm_head and the facts the engine needs about them."""

    family = "qwen2_vl"

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        config = AutoConfig.from_pretrained(checkpoint)
        text_config = config.text_config
        self.model = _text_model_class(config.model_type)._from_config(text_config)
        self.lm_head = torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        prefix = first_prefix_present(checkpoint, ["model.language_model.", "model."])
        if prefix == "model.language_model.":
            rename = {prefix: ""}
        else:  # Hub layout: model.{embed_tokens,layers,norm}.* next to visual.*
            rename = {f"model.{name}.": f"{name}." for name in ("embed_tokens", "layers", "norm")}
        state = load_weights(checkpoint, rename)
        load_strict(self.model, state, f"{checkpoint}: language model ({prefix}*)")
        head = load_weights(checkpoint, {"lm_head.": ""})
        tied = bool(getattr(config, "tie_word_embeddings", False) or text_config.tie_word_embeddings)
        if "weight" not in head and tied:
            head["weight"] = state["embed_tokens.weight"]
        load_strict(self.lm_head, head, f"{checkpoint}: lm_head")
        self.model.to(device=device, dtype=dtype).eval()
        self.lm_head.to(device=device, dtype=dtype).eval()

        self.device = torch.device(device)
        self.dtype = dtype
        self.merge = int(config.vision_config.spatial_merge_size)
        self.image_token_id = int(config.image_token_id)
        self.vocab_size = int(text_config.vocab_size)
        self.hidden_size = int(text_config.hidden_size)
        self.max_model_len = int(text_config.max_position_embeddings)
        self.eos_token_ids = eos_list(text_config.eos_token_id)

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

    def prompt_positions(self, request: GenerateRequest) -> tuple[torch.Tensor, int]:
        """(3, T) positions of the prompt and the rope delta of its decode steps."""
        return mrope_positions(len(request.token_ids), request.images, self.merge)

    @staticmethod
    def decode_positions(position: int) -> torch.Tensor:
        """(3, 1) positions of one decode step: the same position on the t, h and w axes."""
        return torch.full((3, 1), position)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    def forward(
        self, inputs_embeds: torch.Tensor, cache, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(1, T, hidden) new tokens after `cache` at (3, T) `positions` -> (vocab,) float32 logits of the last."""
        if positions is None:  # a cache position alone would miss the image's rope delta
            raise ValueError("Qwen2-VL needs explicit M-RoPE positions (prompt_positions / decode_positions)")
        out = self.model(
            inputs_embeds=inputs_embeds,
            position_ids=positions.to(self.device)[:, None, :],
            cache=cache,
            use_cache=True,
        )
        return self.lm_head(out.last_hidden_state[0, -1]).float()
