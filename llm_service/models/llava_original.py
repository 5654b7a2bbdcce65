"""Original LLaVA (haotian-liu/LLaVA layout) language half: the LLaMA/Mistral decoder + lm_head from
`model.*` / `lm_head.*`, without `model.mm_projector.*` or any vision tower weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmserve.checkpoint import load_strict, load_weights
from mmserve.llava_original import OriginalLlavaConfig, image_placeholder_id

_NOT_LM = ("model.mm_projector.", "model.vision_tower.", "model.vision_resampler.")


class LlavaOriginalLanguageModel:
    """Owns the causal LM and the facts the engine needs about it."""

    family = "llava_original"

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        mm = OriginalLlavaConfig.from_checkpoint(checkpoint)
        text_config = mm.text_config()
        self.model = AutoModelForCausalLM.from_config(text_config)
        # The multimodal tensors also start with "model."; they are mapped aside and dropped.
        rename = {prefix: "__skip__." for prefix in _NOT_LM}
        rename.update({"model.": "model.", "lm_head.": "lm_head."})
        state = {k: v for k, v in load_weights(checkpoint, rename).items() if not k.startswith("__skip__.")}
        if "lm_head.weight" not in state and text_config.tie_word_embeddings:
            state["lm_head.weight"] = state.get("model.embed_tokens.weight")
        load_strict(self.model, state, f"{checkpoint}: language model (model.*, lm_head.*)")
        self.model.to(device=device, dtype=dtype).eval()

        self.device = torch.device(device)
        self.dtype = dtype
        self.image_token_id = image_placeholder_id(AutoTokenizer.from_pretrained(checkpoint))
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
