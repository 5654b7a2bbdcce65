"""Original LLaVA (haotian-liu/LLaVA layout) language half: the LLaMA/Mistral decoder + lm_head from
`model.*` / `lm_head.*`, without `model.mm_projector.*` or any vision tower weights."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from llm_service.models.base import LanguageModel, checkpoint_eos
from llm_service.models.decoder import DecoderConfig
from mmserve.checkpoint import load_weights
from mmserve.llava_original import OriginalLlavaConfig, image_placeholder_id

_NOT_LM = ("model.mm_projector.", "model.vision_tower.", "model.vision_resampler.")


class LlavaOriginalLanguageModel(LanguageModel):
    family = "llava_original"

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        mm = OriginalLlavaConfig.from_checkpoint(checkpoint)
        text_config = mm.text_config()
        # The multimodal tensors also start with "model."; they are mapped aside and dropped.
        rename = {prefix: "__skip__." for prefix in _NOT_LM}
        rename.update({"model.": "model.", "lm_head.": "lm_head."})
        state = {k: v for k, v in load_weights(checkpoint, rename).items() if not k.startswith("__skip__.")}
        self._load(
            DecoderConfig.from_hf(text_config),
            state,
            f"{checkpoint}: language model (model.*, lm_head.*)",
            device,
            dtype,
            image_token_id=image_placeholder_id(AutoTokenizer.from_pretrained(checkpoint)),
            eos_token_ids=checkpoint_eos(checkpoint, text_config.eos_token_id),
            tie_word_embeddings=bool(text_config.tie_word_embeddings),
        )
