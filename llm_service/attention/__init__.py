"""Attention over the paged KV cache: one backend per kernel family, each with its own metadata.

A token at logical index i of a sequence lives in block block_table[i // block_size], row
i % block_size. The flat batch of a step puts single-token sequences (decodes) first, then the
multi-token chunks (prefill, or recompute after preemption). The model runner hands a step's
decodes and chunks to its backend, which builds its own metadata; the decoder passes that metadata
back to the same backend in every layer.

- `sdpa` (llm_service/attention/sdpa.py): CPU, and the GPU fallback; owns the decode staging
  (llm_service/attention/sdpa_staging.py).
- `flash_attn` (llm_service/attention/flash.py): CUDA, when the optional flash-attn package is
  installed (imported only when a step runs).
"""

from __future__ import annotations

import torch

from llm_service.attention.flash import FLASH_BLOCK_SIZE, FlashAttention, FlashMetadata, flash_attn_available
from llm_service.attention.paged import LayerCache, PagedAttention
from llm_service.attention.sdpa import PrefillChunk, SdpaAttention, SdpaMetadata

BACKENDS = ("auto", "sdpa", "flash_attn")

# What a decoder layer hands its backend: the metadata that backend built for this step.
AttentionMetadata = SdpaMetadata | FlashMetadata

__all__ = [
    "BACKENDS",
    "FLASH_BLOCK_SIZE",
    "AttentionMetadata",
    "FlashAttention",
    "FlashMetadata",
    "LayerCache",
    "PagedAttention",
    "backend_block_size",
    "PrefillChunk",
    "SdpaAttention",
    "SdpaMetadata",
    "flash_attn_available",
    "make_backend",
    "resolve_backend",
]


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` is flash_attn on CUDA when it is installed, sdpa otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "flash_attn" if flash_attn_available(device) else "sdpa"
    if name == "flash_attn" and not flash_attn_available(device):
        raise ValueError("attention backend flash_attn needs a CUDA device and the flash-attn package")
    return name


def backend_block_size(name: str, requested: int) -> int:
    """Tokens per KV block for backend `name` (a resolved name): flash-attn's paged kernels need 256."""
    return FLASH_BLOCK_SIZE if name == "flash_attn" else requested


def make_backend(
    name: str, block_size: int, device: torch.device, decode_staging_bytes: int = 0
) -> PagedAttention:
    """The backend `name` (a resolved name); decode staging is the sdpa backend's alone."""
    if name == "flash_attn":
        return FlashAttention(block_size, device)
    return SdpaAttention(block_size, device, decode_staging_bytes)
