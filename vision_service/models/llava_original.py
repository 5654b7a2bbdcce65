"""Original LLaVA (haotian-liu/LLaVA layout) vision half: the CLIP tower from the folder that
`mm_vision_tower` names, plus `model.mm_projector.*` from the checkpoint; the LM is never read."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from mmserve.checkpoint import first_prefix_present, load_strict, load_weights
from mmserve.errors import CheckpointError
from mmserve.llava_original import OriginalLlavaConfig
from vision_service.models import clip
from vision_service.models.base import EmbeddingConfig, TextWidth, VisionModel, processor_pixels


def build_projector(kind: str, mm_hidden: int, hidden: int) -> torch.nn.Module:
    """llava/model/multimodal_projector/builder.py: linear, mlpNx_gelu or identity."""
    if kind == "linear":
        return torch.nn.Linear(mm_hidden, hidden)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match:
        layers: list[torch.nn.Module] = [torch.nn.Linear(mm_hidden, hidden)]
        for _ in range(int(match.group(1)) - 1):
            layers += [torch.nn.GELU(), torch.nn.Linear(hidden, hidden)]
        return torch.nn.Sequential(*layers)
    if kind == "identity":
        return torch.nn.Identity()
    raise CheckpointError(f"mm_projector_type={kind!r} is not supported (linear, mlpNx_gelu, identity)")


@dataclass
class OriginalProcessor:
    """The CLIP image processor plus the checkpoint's `image_aspect_ratio` handling."""

    clip: object
    pad_to_square: bool

    def background(self) -> tuple[int, int, int]:
        return tuple(int(x * 255) for x in self.clip.image_mean)  # type: ignore[attr-defined, return-value]


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """llava/mm_utils.py: pad to a square, the image centred, with the processor's mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class LlavaOriginalVision(VisionModel):
    family = "llava_original"

    def __init__(self, mm: OriginalLlavaConfig, clip_config, text_hidden: int):
        super().__init__()
        self.config = EmbeddingConfig(TextWidth(text_hidden), clip_config)
        self.vision_tower = AutoModel.from_config(clip_config)
        mm_hidden = mm.mm_hidden_size or clip_config.hidden_size
        self.mm_projector = build_projector(mm.projector_type, mm_hidden, text_hidden)
        self.feature_states = clip.state_indices(mm.select_layer, clip_config.num_hidden_layers)
        self.keep_cls = mm.select_feature == "cls_patch"

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str) -> LlavaOriginalVision:
        mm = OriginalLlavaConfig.from_checkpoint(checkpoint)
        clip_config = AutoConfig.from_pretrained(mm.vision_tower)
        clip_config = getattr(clip_config, "vision_config", clip_config)  # a full CLIPModel folder
        model = cls(mm, clip_config, int(mm.text_config().hidden_size))

        # A full CLIP checkpoint (openai/clip-vit-*) nests the tower under vision_model.; a saved
        # CLIPVisionModel may not. Only the tower's keys are read.
        try:
            prefix = first_prefix_present(mm.vision_tower, ["vision_model."])
        except CheckpointError:
            prefix = ""
        clip.load_tower(
            model.vision_tower,
            load_weights(mm.vision_tower, {prefix: ""}),
            f"{mm.vision_tower}: CLIP vision tower ({prefix}*)",
        )
        load_strict(
            model.mm_projector,
            load_weights(checkpoint, {"model.mm_projector.": ""}),
            f"{checkpoint}: projector model.mm_projector.* ({mm.projector_type})",
        )
        clip.drop_unused_layers(model.vision_tower, model.feature_states)
        return model.to(device=device, dtype=dtype).eval()

    @staticmethod
    def load_processor(checkpoint: str) -> OriginalProcessor:
        mm = OriginalLlavaConfig.from_checkpoint(checkpoint)
        return OriginalProcessor(
            AutoImageProcessor.from_pretrained(mm.vision_tower), mm.image_aspect_ratio == "pad"
        )

    @staticmethod
    def preprocess_one(processor: OriginalProcessor, image: Image.Image) -> dict[str, np.ndarray]:
        """One decoded image -> (3, H, W) pixels (padded to a square first for image_aspect_ratio=pad)."""
        if processor.pad_to_square:
            image = expand2square(image, processor.background())
        return processor_pixels(processor.clip, image)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) pixels -> B tensors of (N, text_hidden)."""
        features = clip.features(
            self.vision_tower, pixel_values, self.feature_states, drop_cls=not self.keep_cls
        )
        return list(self.mm_projector(features))
