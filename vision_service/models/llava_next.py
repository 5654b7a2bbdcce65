"""LLaVA-NeXT (llava-hf `LlavaNextForConditionalGeneration`) vision half: CLIP tower + projector +
image_newline, with anyres tiling; loaded without the LM.

Each image is tiled by the LLaVA-NeXT image processor into its own number of crops (base image + grid),
and yields its own number of feature rows (unpadded grid + one newline per row + the base image),
exactly as transformers' `LlavaNextModel.get_image_features` packs them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    LlavaNextMultiModalProjector,
    image_size_to_num_patches,
)

from mmserve.checkpoint import load_strict, load_weights
from vision_service.models import clip
from vision_service.models.llava import LlavaVision


class LlavaNextVision(LlavaVision):
    family = "llava_next"
    projector_class = LlavaNextMultiModalProjector

    def __init__(self, config):
        super().__init__(config)
        self.image_newline = torch.nn.Parameter(torch.empty(config.text_config.hidden_size))

    def _load_extra(self, checkpoint: str, root: str) -> None:
        newline = load_weights(checkpoint, {root + "image_newline": "image_newline"})
        load_strict(_Newline(self), newline, f"{checkpoint}: {root}image_newline")

    @staticmethod
    def preprocess_one(processor, image: Image.Image) -> dict[str, np.ndarray]:
        """One decoded image -> its crops (P, 3, H, W) and its original size (H, W)."""
        out = processor(images=[image], return_tensors="np")
        return {"pixel_values": out["pixel_values"][0], "image_sizes": np.asarray(out["image_sizes"][0])}

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Images with different crop counts -> all their crops in one batch, plus each image's count."""
        return {
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
            "image_sizes": torch.stack([item["image_sizes"].reshape(2) for item in items]),
            "num_patches": torch.tensor([item["pixel_values"].shape[0] for item in items]),
        }

    @torch.inference_mode()
    def forward(  # type: ignore[override]  # its inputs come from this class's collate
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, num_patches: torch.Tensor
    ) -> list[torch.Tensor]:
        """(sum P_i, 3, H, W) crops of B images -> B tensors of (N_i, text_hidden)."""
        counts = [int(n) for n in num_patches]
        for size, count in zip(image_sizes.tolist(), counts, strict=True):
            expected = image_size_to_num_patches(
                size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            if count != expected:
                raise ValueError(f"an image of size {size} has {count} crops; its grid needs {expected}")
        selected = clip.features(
            self.vision_tower, pixel_values, self.feature_states, drop_cls=self.select_strategy == "default"
        )
        features = torch.split(self.multi_modal_projector(selected), counts, dim=0)
        packed, _ = LlavaNextModel.pack_image_features(
            self,  # type: ignore[arg-type] # it reads only .config
            list(features),
            image_sizes,
            vision_feature_select_strategy=self.select_strategy,
            image_newline=self.image_newline,
        )
        return list(packed)


class _Newline(torch.nn.Module):
    """A view of the one image_newline parameter, so that load_strict checks its key like any other."""

    def __init__(self, model: LlavaNextVision):
        super().__init__()
        self.image_newline = model.image_newline
