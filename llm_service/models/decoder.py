"""Llama / Qwen2 decoder written for the paged-KV engine (LLaVA's, Qwen2-VL's and Qwen-VL's LM).

Runs one flat batch of tokens from many sequences at once: (T, hidden) in, (T, hidden) out, with the
attention reading and writing the paged cache through `AttentionMetadata`. Positions are (T,) for
1-D RoPE, or (3, T) for Qwen2-VL's M-RoPE, whose frequencies are split into t/h/w sections.
The arithmetic follows transformers' Llama/Qwen2 modules step for step (RMSNorm in float32, cos/sin
in float32 then cast), so float32 outputs match them; q/k/v and gate/up are packed into one matmul each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.attention import AttentionMetadata
from mmserve.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text")


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    inv_freq: torch.Tensor  # (head_dim / 2,) float32 RoPE inverse frequencies
    rope_scaling: float = 1.0  # multiplies cos/sin (transformers' attention_scaling)
    mrope_section: tuple[int, ...] | None = None  # M-RoPE: frequencies per t/h/w axis
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config) -> DecoderConfig:
        """From a transformers text config (Llama, Mistral, Qwen2, Qwen2-VL's text part)."""
        model_type = getattr(config, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"language model type {model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
        if getattr(config, "mlp_bias", False):
            raise CheckpointError("mlp_bias=True is not supported")
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        inv_freq, scaling = _rope_frequencies(config, rope, head_dim)
        section = rope.get("mrope_section")
        max_len = int(config.max_position_embeddings)
        window = getattr(config, "sliding_window", None)
        if window and (model_type == "mistral" or getattr(config, "use_sliding_window", False)):
            max_len = min(max_len, int(window))  # within the window, sliding attention is full attention
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            qkv_bias=model_type.startswith("qwen2") or bool(getattr(config, "attention_bias", False)),
            inv_freq=inv_freq,
            rope_scaling=scaling,
            mrope_section=tuple(int(s) for s in section) if section else None,
            max_position_embeddings=max_len,
        )


def _rope_frequencies(config, rope: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    rope_type = rope.get("rope_type", "default")
    if rope_type in ("default", "mrope"):
        base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":  # its frequencies change with the sequence length
        raise CheckpointError("dynamic NTK RoPE scaling is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(f"RoPE type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' order: normalise in float32, cast back, then scale (bit-identical to it).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class Rotary(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.inv_freq = config.inv_freq  # float32 on purpose: not a buffer, so .to(dtype) leaves it alone
        self.scaling = config.rope_scaling
        self.mrope_section = config.mrope_section

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) or (3, T) positions -> cos, sin of shape (T, 1, head_dim)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (T, d/2) or (3, T, d/2)
        if positions.dim() == 2:
            assert self.mrope_section, "3-D positions need an M-RoPE model"
            parts = freqs.split(list(self.mrope_section), dim=-1)
            freqs = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)  # (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


AttentionFn = Callable[..., torch.Tensor]


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata, attend: AttentionFn) -> torch.Tensor:
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = rotate(
            qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin
        )  # q and k at once
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # (T, heads, d), (T, kv_heads, d)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = attend(q, k, v, kv_cache, meta, self.scale)  # (T, heads, d)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, meta, attend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """Token embeddings, decoder layers, final norm and lm_head."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)

    def forward(
        self,
        embeds: torch.Tensor,  # (T, hidden)
        positions: torch.Tensor,  # (T,) or (3, T)
        kv_caches: list,  # one LayerCache per layer
        meta: AttentionMetadata,
        attend: AttentionFn,
    ) -> torch.Tensor:
        """-> (T, hidden) final hidden states, before the norm."""
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta, attend)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) rows to sample from -> (N, vocab) float32 logits."""
        return self.lm_head(self.norm(hidden)).float()


def pack_hf_weights(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers Llama/Qwen2 names (`model.` prefix optional) -> DecoderLM names, q/k/v and
    gate/up concatenated. Keys it does not know pass through (load_strict reports them).

    `state` is emptied as it is read, so each source tensor is freed once packed: the weights are
    held once, not twice, while loading."""
    state = {k.removeprefix("model."): state.pop(k) for k in list(state)}
    for i in range(num_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for kind in ("weight", "bias"):
            parts = [attn + f"{p}_proj.{kind}" for p in "qkv"]
            if all(p in state for p in parts):
                state[attn + f"qkv_proj.{kind}"] = torch.cat([state.pop(p) for p in parts])
        parts = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        if all(p in state for p in parts):
            state[mlp + "gate_up_proj.weight"] = torch.cat([state.pop(p) for p in parts])
    return state
