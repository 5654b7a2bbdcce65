"""LLaVA (llava-hf format) language half: the text decoder + lm_head, loaded without the vision tower."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from llm_service.models.base import LanguageModel, checkpoint_eos
from llm_service.models.decoder import DecoderConfig
from mmserve.checkpoint import first_prefix_present, load_weights


class LlavaLanguageModel(LanguageModel):
    family = "llava"

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        config = AutoConfig.from_pretrained(checkpoint)
        text_config = config.get_text_config()
        decoder_prefix = first_prefix_present(checkpoint, ["model.language_model.", "language_model.model."])
        head_prefix = "lm_head." if decoder_prefix == "model.language_model." else "language_model.lm_head."
        state = load_weights(checkpoint, {decoder_prefix: "model.", head_prefix: "lm_head."})
        self._load(
            DecoderConfig.from_hf(text_config),
            state,
            f"{checkpoint}: language model ({decoder_prefix}*)",
            device,
            dtype,
            # transformers' config class reads image_token_index (older llava-hf) as image_token_id
            image_token_id=int(config.image_token_id),
            eos_token_ids=checkpoint_eos(checkpoint, text_config.eos_token_id),
            # transformers ties by the top-level config's flag (PreTrainedModel.tie_weights)
            tie_word_embeddings=bool(config.tie_word_embeddings),
        )
