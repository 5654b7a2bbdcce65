"""What the vision adapters share: the module base with its defaults, and fixed-size pixel batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmserve.interfaces import VisionAdapter


@dataclass(frozen=True)
class TextWidth:
    hidden_size: int  # the language model's hidden size: the width of one embedding row


@dataclass(frozen=True)
class EmbeddingConfig:
    """The config of a vision half whose checkpoint has no transformers config of the whole model
    (original LLaVA, Qwen-VL): the tower's own config and the width of the rows it serves."""

    text_config: TextWidth
    vision_config: Any  # a CLIPVisionConfig, or Qwen-VL's VisualConfig


class VisionModel(torch.nn.Module, VisionAdapter):
    """A vision half as a torch module; `config.text_config.hidden_size` is the row width.
    By default one image is one (3, H, W) pixel tensor, all of one size (collate stacks them)."""

    config: Any  # the family's transformers config, or an EmbeddingConfig

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inputs of several images (of any requests) -> one batch; fixed-size inputs share one shape."""
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}


def processor_pixels(processor: Any, image: Image.Image) -> dict[str, np.ndarray]:
    """One image through a transformers image processor -> {"pixel_values": (3, H, W)}."""
    return {"pixel_values": processor(images=[image], return_tensors="np")["pixel_values"][0]}
