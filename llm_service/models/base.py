"""What every language adapter gives the engine: the decoder, the facts about it, and positions."""

from __future__ import annotations

import torch

from llm_service.models.decoder import DecoderConfig, DecoderLM, pack_hf_weights
from mmserve.checkpoint import generation_config, load_strict
from mmserve.interfaces import LanguageAdapter


def eos_list(eos) -> list[int]:
    """A config's eos_token_id (an int, a list or None) as a list."""
    return [eos] if isinstance(eos, int) else list(eos or [])


def checkpoint_eos(checkpoint: str, config_eos) -> list[int]:
    """End-of-sequence ids: config.json's, then generation_config.json's (Qwen2-VL Instruct lists
    <|im_end|> and <|endoftext|> there, config.json only the first), without repeats."""
    ids = eos_list(config_eos) + eos_list(generation_config(checkpoint).get("eos_token_id"))
    return list(dict.fromkeys(int(i) for i in ids))


class LanguageModel(LanguageAdapter):
    """A loaded `DecoderLM` plus the facts the engine needs. Subclasses read the checkpoint and call
    `_load` with transformers-named weights (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
    Positions are 1-D here; M-RoPE models set position_dims = 3 and override `positions`."""

    family = ""  # a random model (benchmarks) has none
    tokenizer_path: str | None = None  # the checkpoint's tokenizer folder (structured output's matchers)
    decoder: DecoderLM

    def _load(
        self,
        config: DecoderConfig,
        state: dict[str, torch.Tensor],
        what: str,
        device: str,
        dtype: torch.dtype,
        *,
        image_token_id: int,
        eos_token_ids: list[int],
        tie_word_embeddings: bool = False,
        max_model_len: int | None = None,
    ) -> None:
        state = pack_hf_weights(state, config.num_layers)
        tied = "lm_head.weight" not in state and tie_word_embeddings and "embed_tokens.weight" in state
        if tied:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        with torch.device("meta"):  # no random init: the checkpoint's tensors are assigned as they are
            self.decoder = DecoderLM(config)
        load_strict(self.decoder, state, what, assign=True)
        state.clear()  # the decoder holds the tensors now; a dtype cast below then frees each source
        self.decoder.to(device=device, dtype=dtype).eval()
        if tied:  # .to() casts each Parameter on its own: share the one tensor again
            self.decoder.lm_head.weight = self.decoder.embed_tokens.weight
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_token_id = int(image_token_id)
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.eos_token_ids = eos_token_ids

    @classmethod
    def random(
        cls, config: DecoderConfig, device: str, dtype: torch.dtype, *, image_token_id: int = 0, seed: int = 0
    ) -> LanguageModel:
        """A random-weight model of `config` built on `device` (benchmarks: no checkpoint to read)."""
        model = cls.__new__(cls)
        torch.manual_seed(seed)
        with torch.device(device):
            model.decoder = DecoderLM(config).to(dtype)
        for name, param in model.decoder.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(param, std=0.02)
        model.decoder.eval()
        model.device, model.dtype = torch.device(device), dtype
        model.image_token_id, model.eos_token_ids = image_token_id, []
        model.vocab_size, model.hidden_size = config.vocab_size, config.hidden_size
        model.max_model_len = config.max_position_embeddings
        return model

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(token_ids.to(self.device))

    def positions(self, seq, start: int, end: int) -> torch.Tensor:
        """(end - start,) RoPE positions of tokens [start, end) of `seq` (M-RoPE models: (3, n))."""
        return torch.arange(start, end)
