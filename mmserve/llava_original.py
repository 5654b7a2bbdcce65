"""The original LLaVA checkpoint layout (haotian-liu/LLaVA), read the same way by all three processes.

config.json is a LLaMA (or Mistral) config plus `mm_*` keys; the weights hold the LM and
`model.mm_projector.*`; the CLIP tower is a separate checkpoint named by `mm_vision_tower`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmserve.checkpoint import read_config
from mmserve.errors import CheckpointError

# Tokens of the original code base (llava/constants.py).
IMAGE_TAG = "<image>"
IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"

# config.json keys that describe the multimodal parts, not the text model.
_MM_KEYS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path")


@dataclass(frozen=True)
class OriginalLlavaConfig:
    raw: dict
    vision_tower: str  # a local folder (resolved) or a hub id
    select_layer: int
    select_feature: str  # "patch" (drop CLS) or "cls_patch"
    projector_type: str
    mm_hidden_size: int | None
    use_im_start_end: bool
    image_aspect_ratio: str

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> OriginalLlavaConfig:
        raw = read_config(checkpoint)
        if "mm_vision_tower" not in raw:
            raise CheckpointError(
                f"{checkpoint}: config.json has no mm_vision_tower (not an original LLaVA checkpoint)"
            )
        select_feature = raw.get("mm_vision_select_feature", "patch")
        if select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(
                f"{checkpoint}: mm_vision_select_feature={select_feature!r} is not patch or cls_patch"
            )
        aspect = raw.get("image_aspect_ratio") or "square"
        if aspect not in ("pad", "square", "resize"):
            raise CheckpointError(
                f"{checkpoint}: image_aspect_ratio={aspect!r} is not supported (pad or square)"
            )
        return cls(
            raw=raw,
            vision_tower=resolve_vision_tower(checkpoint, raw["mm_vision_tower"]),
            select_layer=int(raw.get("mm_vision_select_layer", -1)),
            select_feature=select_feature,
            projector_type=raw.get("mm_projector_type", "linear"),
            mm_hidden_size=raw.get("mm_hidden_size"),
            use_im_start_end=bool(raw.get("mm_use_im_start_end", False)),
            image_aspect_ratio=aspect,
        )

    def text_config(self):
        """The LM's transformers config (LLaMA, or Mistral for llava_mistral checkpoints)."""
        from transformers import LlamaConfig, MistralConfig

        fields = {k: v for k, v in self.raw.items() if k not in _MM_KEYS and not k.startswith("mm_")}
        is_mistral = self.raw.get("model_type") == "llava_mistral" or any(
            "Mistral" in a for a in self.raw.get("architectures") or []
        )
        return (MistralConfig if is_mistral else LlamaConfig)(**fields)


def resolve_vision_tower(checkpoint: str | Path, name: str) -> str:
    """`mm_vision_tower` as a folder: absolute, relative to the checkpoint, relative to the working
    directory, or else a hub id (downloaded where a network exists)."""
    candidates = [Path(name)] if Path(name).is_absolute() else [Path(checkpoint) / name, Path(name)]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return str(folder.resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as exc:  # noqa: BLE001 - any failure means the tower is unavailable
        raise CheckpointError(
            f"{checkpoint}: mm_vision_tower={name!r} is neither a local CLIP folder (looked in "
            f"{', '.join(str(c) for c in candidates)}) nor a downloadable hub id: {exc}"
        ) from None


def image_placeholder_id(tokenizer) -> int:
    """The in-vocabulary id that stands for one image feature row in prompts sent to the LLM.

    The original code splices a marker id (-200) that no embedding row has; this stack sends real ids,
    so it uses `<image>` when the tokenizer has it as one token, else `<im_patch>`, else `<unk>`.
    Both the gateway and the LLM service derive it from the checkpoint's tokenizer with this function.
    """
    unk = tokenizer.unk_token_id
    for token in (IMAGE_TAG, IM_PATCH):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id >= 0 and token_id != unk:
            return token_id
    for token_id in (unk, tokenizer.pad_token_id):
        if token_id is not None:
            return int(token_id)
    raise CheckpointError(
        "the tokenizer has none of <image>, <im_patch>, <unk> or a pad token for image placeholders"
    )
