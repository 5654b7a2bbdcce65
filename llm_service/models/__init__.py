"""Language-model adapters, one per model family: the registry below is the only place that lists them."""

from __future__ import annotations

from llm_service.models.llava import LlavaLanguageModel

LANGUAGE_ADAPTERS = {"llava": LlavaLanguageModel}


def load_language_model(config):
    """The language half of `config.checkpoint` (an LLMConfig), with the family's adapter."""
    import torch

    from mmserve.checkpoint import detect_family, parse_dtype

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    family = detect_family(config.checkpoint, config.model_type)
    return LANGUAGE_ADAPTERS[family](config.checkpoint, parse_dtype(config.dtype), config.device)
