"""LLaVA (llava-hf format) vision half: CLIP tower + multi-modal projector, loaded without the LM."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmserve.checkpoint import first_prefix_present, load_strict, load_weights


class LlavaVision(torch.nn.Module):
    family = "llava"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        num_layers = config.vision_config.num_hidden_layers
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
        self.feature_states = [i if i >= 0 else num_layers + 1 + i for i in layers]
        self.select_strategy = config.vision_feature_select_strategy

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str) -> LlavaVision:
        config = AutoConfig.from_pretrained(checkpoint)
        model = cls(config)
        tower_prefix = first_prefix_present(checkpoint, ["model.vision_tower.", "vision_tower."])
        projector_prefix = tower_prefix.replace("vision_tower.", "multi_modal_projector.")
        tower_state = load_weights(checkpoint, {tower_prefix: ""})
        # Hub checkpoints nest the CLIP weights under `vision_model.`; transformers 5 modules do not.
        expects_nested = any(k.startswith("vision_model.") for k in model.vision_tower.state_dict())
        tower_state = {_nest(k, expects_nested): v for k, v in tower_state.items()}
        load_strict(model.vision_tower, tower_state, f"{checkpoint}: vision tower ({tower_prefix}*)")
        load_strict(
            model.multi_modal_projector,
            load_weights(checkpoint, {projector_prefix: ""}),
            f"{checkpoint}: projector ({projector_prefix}*)",
        )
        model._drop_unused_layers()
        return model.to(device=device, dtype=dtype).eval()

    def _drop_unused_layers(self) -> None:
        """Layers after the deepest selected hidden state never influence the features (LLaVA uses -2)."""
        encoder = getattr(self.vision_tower, "vision_model", self.vision_tower).encoder
        del encoder.layers[max(max(self.feature_states), 1) :]  # keep one: an empty encoder returns no states

    @staticmethod
    def load_processor(checkpoint: str):
        return AutoImageProcessor.from_pretrained(checkpoint)

    @staticmethod
    def preprocess_one(processor, image: Image.Image) -> dict[str, np.ndarray]:
        """One decoded image -> its model inputs, without the batch dimension."""
        pixels = processor(images=[image], return_tensors="np")["pixel_values"][0]  # (3, H, W)
        return {"pixel_values": pixels}

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inputs of several images (of any requests) -> one batch; CLIP inputs all share one size."""
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) pixels -> B tensors of (N, text_hidden)."""
        param = next(self.parameters())
        out = self.vision_tower(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        selected = [out.hidden_states[i] for i in self.feature_states]  # each (B, 1 + patches, vision_hidden)
        if self.select_strategy == "default":
            selected = [h[:, 1:] for h in selected]  # drop CLS
        features = self.multi_modal_projector(torch.cat(selected, dim=-1))  # (B, N, text_hidden)
        return list(features)

    @staticmethod
    def grid_thw(item: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return ()


def _nest(key: str, nested: bool) -> str:
    if nested and not key.startswith("vision_model."):
        return "vision_model." + key
    if not nested and key.startswith("vision_model."):
        return key[len("vision_model.") :]
    return key
