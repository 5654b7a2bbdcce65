"""Qwen-VL / Qwen-VL-Chat (v1) language half: Qwen-7B v1 weights mapped onto transformers' Qwen2ForCausalLM.

The mapping is exact for sequences of up to `seq_length` (2048) tokens:
Qwen v1's logn attention scaling and dynamic-NTK RoPE only act beyond it, and Qwen2 has neither, so
the served context is capped at `seq_length` (MAX_MODEL_LEN may lower it, never raise it).
Image spans are `<img>` + 256 x `<imgpad>` + `</img>`; the pads' embeddings are replaced by the vision
service's rows (the original overwrote all positions between the tags: the same thing).
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config

from llm_service.models.base import LanguageModel
from llm_service.models.decoder import DecoderConfig
from mmserve.checkpoint import load_weights, read_config
from mmserve.errors import CheckpointError

IMG_PAD_ID = 151859  # <imgpad>
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645


def qwen2_config(config: dict) -> Qwen2Config:
    """Qwen v1 config.json -> the equivalent Qwen2Config."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("kv_channels", hidden // heads))
    if head_dim * heads != hidden:
        raise CheckpointError(f"kv_channels={head_dim} x {heads} heads != hidden_size={hidden}")
    if float(config.get("rotary_pct", 1.0)) != 1.0:
        raise CheckpointError(f"rotary_pct={config['rotary_pct']} is not supported (Qwen-VL uses 1.0)")
    return Qwen2Config(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]) // 2,  # w1/w2 each hold half of it
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        rms_norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rotary_emb_base", 10000))},
        tie_word_embeddings=False,  # a tied checkpoint's lm_head is loaded as a copy of wte
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=None,
    )


def map_weights(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Qwen v1 keys (`transformer.` stripped) -> transformers Qwen2ForCausalLM keys."""
    out: dict[str, torch.Tensor] = {}
    take = state.pop

    def pop(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"Qwen-VL language model: the checkpoint has no transformer.{key}")
        return take(key)

    out["model.embed_tokens.weight"] = pop("wte.weight")
    out["model.norm.weight"] = pop("ln_f.weight")
    head = state.pop("lm_head.weight", None)
    out["lm_head.weight"] = head if head is not None else out["model.embed_tokens.weight"].clone()
    for i in range(num_layers):
        src, dst = f"h.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = pop(src + "ln_1.weight")
        out[dst + "post_attention_layernorm.weight"] = pop(src + "ln_2.weight")
        for name in ("weight", "bias"):
            q, k, v = pop(src + f"attn.c_attn.{name}").chunk(3, dim=0)
            out[dst + f"self_attn.q_proj.{name}"] = q
            out[dst + f"self_attn.k_proj.{name}"] = k
            out[dst + f"self_attn.v_proj.{name}"] = v
        out[dst + "self_attn.o_proj.weight"] = pop(src + "attn.c_proj.weight")
        out[dst + "mlp.gate_proj.weight"] = pop(src + "mlp.w2.weight")  # the SiLU branch
        out[dst + "mlp.up_proj.weight"] = pop(src + "mlp.w1.weight")
        out[dst + "mlp.down_proj.weight"] = pop(src + "mlp.c_proj.weight")
    out.update({f"unmapped.{k}": v for k, v in state.items()})  # reported by load_strict as unexpected
    return out


class QwenVLLanguageModel(LanguageModel):
    family = "qwen_vl"

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str):
        config = read_config(checkpoint)
        self.config = qwen2_config(config)
        prefixes = {"transformer.h.": "h.", "transformer.wte.": "wte.", "transformer.ln_f.": "ln_f."}
        state = load_weights(checkpoint, {**prefixes, "lm_head.": "lm_head."})
        state = map_weights(state, self.config.num_hidden_layers)
        self._load(
            DecoderConfig.from_hf(self.config),
            state,
            f"{checkpoint}: Qwen-VL language model (transformer.*, lm_head)",
            device,
            dtype,
            image_token_id=IMG_PAD_ID,
            eos_token_ids=[ENDOFTEXT_ID, IM_END_ID, IM_START_ID],
            # Exact only up to seq_length: beyond it Qwen v1 switches on logn attention and dynamic NTK.
            max_model_len=int(config.get("seq_length", 2048)),
        )
