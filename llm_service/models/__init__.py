"""Language-model adapters, one module per model family (listed in mmserve/families.py)."""

from __future__ import annotations


def load_language_model(config):
    """The language half of `config.checkpoint` (an LLMConfig), with the family's adapter."""
    import torch

    from mmserve.checkpoint import parse_dtype, resolve_dtype
    from mmserve.families import adapter, detect_family

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    family = detect_family(config.checkpoint, config.model_type)
    dtype = resolve_dtype(config.dtype, config.checkpoint, config.device, "llm")
    return adapter(family, "language")(config.checkpoint, parse_dtype(dtype), config.device)
