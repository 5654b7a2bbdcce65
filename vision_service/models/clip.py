"""CLIP vision-tower pieces shared by the LLaVA adapters: loading, layer selection, feature extraction."""

from __future__ import annotations

from typing import Any

import torch

from mmserve.checkpoint import load_strict


def load_tower(tower: torch.nn.Module, state: dict, what: str) -> None:
    """Load CLIP weights whatever their nesting: Hub checkpoints keep them under `vision_model.`,
    transformers 5 modules may not."""
    nested = any(k.startswith("vision_model.") for k in tower.state_dict())
    prefix = "vision_model."

    def rename(key: str) -> str:
        if nested and not key.startswith(prefix):
            return prefix + key
        if not nested and key.startswith(prefix):
            return key[len(prefix) :]
        return key

    load_strict(tower, {rename(k): v for k, v in state.items()}, what)


def state_indices(layers: int | list[int], num_layers: int) -> list[int]:
    """Config feature layers (negative = from the end) -> indices into hidden_states, where
    hidden_states[0] is the embedding output and hidden_states[i] the output of layer i."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [i if i >= 0 else num_layers + 1 + i for i in layers]


def drop_unused_layers(tower: torch.nn.Module, states: list[int]) -> None:
    """Layers after the deepest selected hidden state never influence the features (LLaVA uses -2)."""
    encoder: Any = getattr(tower, "vision_model", tower).encoder
    del encoder.layers[max(max(states), 1) :]  # keep one: an empty encoder returns no hidden states


def features(
    tower: torch.nn.Module, pixel_values: torch.Tensor, states: list[int], drop_cls: bool
) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, patches [+ 1], vision_hidden x len(states)) selected hidden states."""
    param = next(tower.parameters())
    out = tower(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
    selected = torch.cat([out.hidden_states[i] for i in states], dim=-1)
    return selected[:, 1:] if drop_cls else selected
