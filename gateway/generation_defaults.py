"""Sampling defaults from the checkpoint's generation_config.json, applied to every request field the
request leaves unset (vLLM's `--generation-config auto`): a Qwen2-VL Instruct request without
`repetition_penalty` gets the checkpoint's 1.05, as transformers' `generate` would."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from mmserve.checkpoint import generation_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # generation_config's max_new_tokens; None = up to the context length

    @classmethod
    def from_checkpoint(cls, checkpoint: str) -> GenerationDefaults:
        config = generation_config(checkpoint)
        found = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        if config.get("max_new_tokens") is not None:
            found["max_tokens"] = int(config["max_new_tokens"])
        if found:
            log.info("sampling defaults from %s/generation_config.json: %s", checkpoint, found)
        return cls(**found)
