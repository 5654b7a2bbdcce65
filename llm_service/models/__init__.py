"""Language-model adapters, one module per model family (listed in mmserve/families.py)."""

from __future__ import annotations


def load_language_model(config):
    """The language half of `config.checkpoint` (an LLMConfig), with the family's adapter."""
    import torch

    from mmserve.checkpoint import parse_dtype, resolve_dtype
    from mmserve.families import adapter, detect_family
    from mmserve.half_cpu import upcast_half_matmuls

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    family = detect_family(config.checkpoint, config.model_type)
    dtype = parse_dtype(resolve_dtype(config.dtype, config.checkpoint, config.device, "llm"))
    model = adapter(family, "language")(config.checkpoint, dtype, config.device)
    upcast_half_matmuls(model.decoder, dtype, config.device, "llm")
    model.tokenizer_path = config.tokenizer_path or config.checkpoint
    return model
