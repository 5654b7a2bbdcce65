"""Qwen-VL / Qwen-VL-Chat (v1) vision half, native (no remote code).

The remote code's `visual.py`, rewritten in plain torch with the same parameter names so that the
checkpoint's `transformer.visual.*` tensors load strictly:
ViT (conv1 patchify, bicubic-interpolated `positional_embedding`, ln_pre, resblocks with a fused,
per-head-interleaved `attn.in_proj`, GELU MLP c_fc/c_proj, LayerNorm eps 1e-6) -> the 256-query
cross-attention resampler `attn_pool` (kv_proj, ln_kv/ln_q, 2-D sin-cos `pos_embed` stored in the
checkpoint, nn.MultiheadAttention's parameter layout) -> ln_post -> `@ proj`. Every image gives
exactly n_queries (256) embeddings of output_dim (= the LM's hidden size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmserve.checkpoint import load_strict, load_weights, read_config
from mmserve.errors import CheckpointError
from vision_service.models.base import EmbeddingConfig, TextWidth, VisionModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-6


def interpolate_pos(pos: torch.Tensor, num_positions: int) -> torch.Tensor:
    """(L, C) positional table on a sqrt(L) square -> (num_positions, C), bicubic (visual.py's get_abs_pos)."""
    src, tgt = int(math.sqrt(pos.shape[0])), int(math.sqrt(num_positions))
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class VisualAttention(nn.Module):
    """Self-attention with a fused qkv projection laid out per head: rows [h0: q k v, h1: q k v, ...]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, width)
        b, n, _ = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # (B, heads, L, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = VisualAttention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CrossAttention(nn.Module):
    """nn.MultiheadAttention's computation and parameter names (in_proj_weight = [Wq; Wk; Wv]), batch first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, dim) -> (B, heads, L, dim/heads)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(key, wk, bk)), heads(F.linear(value, wv, bv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """n_queries learned queries cross-attending to the patch features (visual.py's Resampler)."""

    def __init__(self, num_queries: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(num_queries, dim), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = CrossAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, patches, kv_dim) -> (B, n_queries, dim)
        pos = interpolate_pos(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).expand(x.shape[0], -1, -1)
        return self.attn(q + self.pos_embed, x + pos, x)


@dataclass(frozen=True)
class VisualConfig:
    """config.json's `visual` section (the remote code's constructor arguments)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int  # = the LM's hidden size
    n_queries: int = 256

    @classmethod
    def from_dict(cls, visual: dict) -> VisualConfig:
        config = cls(
            image_size=int(visual["image_size"]),
            patch_size=int(visual["patch_size"]),
            width=int(visual["width"]),
            layers=int(visual["layers"]),
            heads=int(visual["heads"]),
            mlp_ratio=float(visual["mlp_ratio"]),
            output_dim=int(visual["output_dim"]),
            n_queries=int(visual.get("n_queries", 256)),
        )
        if config.output_dim % 128:
            raise CheckpointError(
                f"visual.output_dim={config.output_dim} is not a multiple of 128 (resampler heads)"
            )
        return config


class VisionTransformer(nn.Module):
    """`transformer.visual` of a Qwen-VL checkpoint."""

    def __init__(self, visual: VisualConfig):
        super().__init__()
        self.image_size = visual.image_size
        self.num_queries = visual.n_queries
        width, output_dim = visual.width, visual.output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=visual.patch_size, stride=visual.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=LN_EPS)
        self.transformer = TransformerBlock(width, visual.layers, visual.heads, visual.mlp_ratio)
        self.attn_pool = Resampler(self.num_queries, output_dim, output_dim // 128, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=LN_EPS)
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, n_queries, output_dim)."""
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = x + interpolate_pos(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj


@dataclass(frozen=True)
class QwenVLImageProcessor:
    """Plain bicubic resize to size x size (aspect not kept, no crop), /255, CLIP mean/std."""

    size: int

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels: np.ndarray = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)


class QwenVLVision(VisionModel):
    family = "qwen_vl"

    def __init__(self, visual: dict):
        super().__init__()
        config = VisualConfig.from_dict(visual)
        self.vision_tower = VisionTransformer(config)
        self.config = EmbeddingConfig(TextWidth(config.output_dim), config)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str) -> QwenVLVision:
        visual = read_config(checkpoint).get("visual")
        if not isinstance(visual, dict):
            raise CheckpointError(
                f"{checkpoint}: config.json has no `visual` section (not a Qwen-VL checkpoint)"
            )
        model = cls(visual)
        state = load_weights(checkpoint, {"transformer.visual.": ""})
        load_strict(model.vision_tower, state, f"{checkpoint}: Qwen-VL visual (transformer.visual.*)")
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def load_processor(checkpoint: str) -> QwenVLImageProcessor:
        visual = read_config(checkpoint).get("visual") or {}
        return QwenVLImageProcessor(int(visual.get("image_size", 448)))

    @staticmethod
    def preprocess_one(processor: QwenVLImageProcessor, image: Image.Image) -> dict[str, np.ndarray]:
        return {"pixel_values": processor(image)}

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) pixels -> B tensors of (n_queries, output_dim)."""
        param = next(self.parameters())
        return list(self.vision_tower(pixel_values.to(param.device, param.dtype)))
