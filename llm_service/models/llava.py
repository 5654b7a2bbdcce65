"""LLaVA (llava-hf format) language half: the text decoder + lm_head, loaded without the vision tower."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_service.models.base import CausalLMAdapter, eos_list
from mmserve.checkpoint import first_prefix_present, load_strict, load_weights


class LlavaLanguageModel(CausalLMAdapter):
    family = "llava"

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        config = AutoConfig.from_pretrained(checkpoint)
        text_config = config.text_config
        self.model = AutoModelForCausalLM.from_config(text_config)
        decoder_prefix = first_prefix_present(checkpoint, ["model.language_model.", "language_model.model."])
        head_prefix = "lm_head." if decoder_prefix == "model.language_model." else "language_model.lm_head."
        state = load_weights(checkpoint, {decoder_prefix: "model.", head_prefix: "lm_head."})
        if "lm_head.weight" not in state and (text_config.tie_word_embeddings or config.tie_word_embeddings):
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")
        load_strict(self.model, state, f"{checkpoint}: language model ({decoder_prefix}*)")
        self._serve(
            device,
            dtype,
            image_token_id=getattr(config, "image_token_id", None) or config.image_token_index,
            vocab_size=text_config.vocab_size,
            hidden_size=text_config.hidden_size,
            max_model_len=text_config.max_position_embeddings,
            eos_token_ids=eos_list(text_config.eos_token_id),
        )
