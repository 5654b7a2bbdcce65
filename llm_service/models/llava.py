"""LLaVA (llava-hf format) language half: the text decoder + lm_head, loaded without the vision tower."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mmserve.checkpoint import first_prefix_present, load_strict, load_weights


class LlavaLanguageModel:
    """Owns the causal LM and the facts the engine needs about it."""

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
        self.model.to(device=device, dtype=dtype).eval()

        self.device = torch.device(device)
        self.dtype = dtype
        self.image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)
        self.vocab_size = int(text_config.vocab_size)
        self.hidden_size = int(text_config.hidden_size)
        self.max_model_len = int(text_config.max_position_embeddings)
        eos = text_config.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    def forward(self, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
        """(1, T, hidden) new positions after `cache` -> (vocab,) float32 logits of the last one."""
        out = self.model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()
