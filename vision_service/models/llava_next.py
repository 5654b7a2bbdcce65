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
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    LlavaNextMultiModalProjector,
    image_size_to_num_patches,
)

from mmserve.checkpoint import first_prefix_present, load_strict, load_weights
from vision_service.models import clip


class LlavaNextVision(torch.nn.Module):
    family = "llava_next"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        self.image_newline = torch.nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.feature_states = clip.state_indices(
            config.vision_feature_layer, config.vision_config.num_hidden_layers
        )
        self.select_strategy = config.vision_feature_select_strategy

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str) -> LlavaNextVision:
        config = AutoConfig.from_pretrained(checkpoint)
        model = cls(config)
        tower_prefix = first_prefix_present(checkpoint, ["model.vision_tower.", "vision_tower."])
        root = tower_prefix[: -len("vision_tower.")]  # "model." (transformers 5 layout) or "" (Hub layout)
        clip.load_tower(
            model.vision_tower,
            load_weights(checkpoint, {tower_prefix: ""}),
            f"{checkpoint}: vision tower ({tower_prefix}*)",
        )
        load_strict(
            model.multi_modal_projector,
            load_weights(checkpoint, {root + "multi_modal_projector.": ""}),
            f"{checkpoint}: projector ({root}multi_modal_projector.*)",
        )
        newline = load_weights(checkpoint, {root + "image_newline": "image_newline"})
        load_strict(_Newline(model), newline, f"{checkpoint}: {root}image_newline")
        clip.drop_unused_layers(model.vision_tower, model.feature_states)
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def load_processor(checkpoint: str):
        return AutoImageProcessor.from_pretrained(checkpoint)

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
    def forward(
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

    @staticmethod
    def grid_thw(item: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return ()


class _Newline(torch.nn.Module):
    """A view of the one image_newline parameter, so that load_strict checks its key like any other."""

    def __init__(self, model: LlavaNextVision):
        super().__init__()
        self.image_newline = model.image_newline
