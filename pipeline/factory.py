"""Loading both halves of a checkpoint and its prompt adapter into this process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_service.config import LLMConfig
from llm_service.engine import Engine
from llm_service.models import load_language_model
from mmserve.families import adapter, detect_family
from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder

if TYPE_CHECKING:
    from mmserve.interfaces import PromptAdapter


@dataclass
class MultimodalModel:
    """Both halves of a checkpoint plus its prompt adapter, loaded in this process."""

    checkpoint: str
    family: str
    prompt: PromptAdapter
    vision: VisionEncoder
    engine: Engine

    @property
    def tokenizer(self):
        return self.prompt.tokenizer

    def stop(self) -> None:
        self.engine.stop()
        self.vision.close()


def local_checkpoint(name_or_path: str) -> str:
    """A checkpoint folder: `name_or_path` itself, or a hub id downloaded (where a network exists)."""
    if Path(name_or_path).is_dir():
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path)


class ModelFactory:
    @staticmethod
    def from_huggingface(
        name_or_path: str,
        model_type: str | None = None,
        tokenizer_path: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
    ) -> MultimodalModel:
        """Load a local checkpoint folder (or a hub id, where a network exists); dtype "auto" is the
        checkpoint's own (float16 becomes bfloat16 on CPU)."""
        path = local_checkpoint(name_or_path)
        family = detect_family(path, model_type)
        prompt = adapter(family, "prompt")(path, tokenizer_path or path)
        vision = VisionEncoder(
            VisionConfig(checkpoint=path, model_type=model_type, dtype=dtype, device=device)
        )
        llm_config = LLMConfig(
            checkpoint=path, model_type=model_type, dtype=dtype, device=device, tokenizer_path=tokenizer_path
        )
        engine = Engine(load_language_model(llm_config), llm_config.engine)
        return MultimodalModel(path, family, prompt, vision, engine)
