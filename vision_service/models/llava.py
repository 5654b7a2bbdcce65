"""LLaVA (llava-hf format) vision half: CLIP tower + multi-modal projector, loaded without the LM."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmserve.checkpoint import first_prefix_present, load_strict, load_weights
from vision_service.models import clip
from vision_service.models.base import VisionModel, processor_pixels


class LlavaVision(VisionModel):
    family = "llava"
    projector_class: type[torch.nn.Module] = LlavaMultiModalProjector

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = self.projector_class(config)
        self.feature_states = clip.state_indices(
            config.vision_feature_layer, config.vision_config.num_hidden_layers
        )
        self.select_strategy = config.vision_feature_select_strategy

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str):
        model = cls(AutoConfig.from_pretrained(checkpoint))
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
        model._load_extra(checkpoint, root)
        clip.drop_unused_layers(model.vision_tower, model.feature_states)
        return model.to(device=device, dtype=dtype).eval()

    def _load_extra(self, checkpoint: str, root: str) -> None:
        """Weights a variant has beyond the tower and the projector (none here)."""

    @staticmethod
    def load_processor(checkpoint: str):
        return AutoImageProcessor.from_pretrained(checkpoint)

    @staticmethod
    def preprocess_one(processor, image: Image.Image) -> dict[str, np.ndarray]:
        """One decoded image -> its (3, H, W) pixels, without the batch dimension."""
        return processor_pixels(processor, image)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) pixels -> B tensors of (N, text_hidden)."""
        selected = clip.features(  # (B, N, vision_hidden x layers); "default" drops CLS
            self.vision_tower, pixel_values, self.feature_states, drop_cls=self.select_strategy == "default"
        )
        return list(self.multi_modal_projector(selected))  # B x (N, text_hidden)
