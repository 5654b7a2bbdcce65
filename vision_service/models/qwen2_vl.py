"""Qwen2-VL / Qwen2.5-VL vision half: the `visual` tower (ViT + 2x2 patch merger), loaded without the LM.

Dynamic resolution: each image keeps (about) its aspect ratio and gets a patch grid of its own, so a
batch concatenates the images' patches and passes their grids (`grid_thw`) to the tower, which
attends within each image only. The tower's output rows are split back per image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, Qwen2VLImageProcessorPil

from mmserve.checkpoint import first_prefix_present, load_strict, load_weights
from mmserve.errors import InvalidInputError
from vision_service.models.base import VisionModel


def _tower_class(model_type: str):
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        return Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return Qwen2VisionTransformerPretrainedModel


class Qwen2VLVision(VisionModel):
    family = "qwen2_vl"
    # Accepts min_pixels / max_pixels (server-wide and per request): see preprocess_one.
    dynamic_resolution = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_tower = _tower_class(config.model_type)._from_config(config.vision_config)
        self.merge = int(config.vision_config.spatial_merge_size)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str) -> Qwen2VLVision:
        config = AutoConfig.from_pretrained(checkpoint)
        model = cls(config)
        prefix = first_prefix_present(checkpoint, ["model.visual.", "visual."])
        load_strict(
            model.vision_tower,
            load_weights(checkpoint, {prefix: ""}),
            f"{checkpoint}: vision tower ({prefix}*)",
        )
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def load_processor(checkpoint: str):
        return Qwen2VLImageProcessorPil.from_pretrained(checkpoint)

    @staticmethod
    def max_pixels(processor) -> int:
        """The checkpoint's bound on a resized image's area (its processor's longest_edge)."""
        return int(processor.size.get("longest_edge") or 0)

    @staticmethod
    def preprocess_one(
        processor, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> dict[str, np.ndarray]:
        """One decoded image -> its flattened patches (N_patches, C*T*P*P) and grid (3,) = [t, h, w] in patches.

        min_pixels / max_pixels override the checkpoint's bounds of the resized image's area.
        """
        size = dict(processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        if size["shortest_edge"] > size["longest_edge"]:
            raise InvalidInputError(
                f"min_pixels ({size['shortest_edge']}) is larger than max_pixels ({size['longest_edge']})"
            )
        try:
            out = processor(images=[image], size=size, return_tensors="np")
        except ValueError as exc:  # smart_resize: extreme aspect ratio, image too small
            raise InvalidInputError(f"cannot preprocess the image: {exc}") from None
        return {
            "pixel_values": np.ascontiguousarray(out["pixel_values"]),
            "image_grid_thw": np.asarray(out["image_grid_thw"][0], dtype=np.int64),
        }

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Images of different sizes -> all their patches concatenated, plus one grid row per image."""
        return {
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
            "grid_thw": torch.stack([item["image_grid_thw"] for item in items]),
        }

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Concatenated patches of B images + their grids -> B tensors of (t*h*w / merge^2, text_hidden)."""
        param = next(self.parameters())
        out = self.vision_tower(
            pixel_values.to(param.device, param.dtype), grid_thw=grid_thw.to(param.device)
        )
        sizes = (grid_thw.prod(-1) // self.merge**2).tolist()
        return list(torch.split(out.pooler_output, sizes))

    @staticmethod
    def cost(item: dict[str, torch.Tensor]) -> int:
        """Encoder work of one image: its number of patches (bounded per forward by the batcher)."""
        return int(item["pixel_values"].shape[0])

    @staticmethod
    def grid_thw(item: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """[t, h, w] in patches before the merge (HF's image_grid_thw); the LLM divides h, w by the merge."""
        return tuple(int(v) for v in item["image_grid_thw"])
