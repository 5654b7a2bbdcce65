"""What every language adapter gives the engine: the facts about its model, embeddings and a forward."""

from __future__ import annotations

from typing import Any

import torch


def eos_list(eos) -> list[int]:
    """A config's eos_token_id (an int, a list or None) as a list."""
    return [eos] if isinstance(eos, int) else list(eos or [])


class CausalLMAdapter:
    """A loaded transformers causal LM (`self.model`, with its lm_head) plus the facts the engine needs.

    Subclasses load the weights, then call `_serve` with the facts.
    """

    family = ""
    model: Any  # a transformers PreTrainedModel with an lm_head

    def _serve(
        self,
        device: str,
        dtype: torch.dtype,
        *,
        image_token_id: int,
        vocab_size: int,
        hidden_size: int,
        max_model_len: int,
        eos_token_ids: list[int],
    ) -> None:
        self.model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_token_id = int(image_token_id)
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.max_model_len = int(max_model_len)
        self.eos_token_ids = eos_token_ids

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    def forward(self, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
        """(1, T, hidden) new positions after `cache` -> (vocab,) float32 logits of the last one."""
        out = self.model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()
