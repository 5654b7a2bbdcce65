"""Configuration of the LLM service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from llm_service.engine.config import EngineConfig
from mmserve.cli import EnvFlags
from mmserve.service_config import ServiceConfig, parse_service_args, service_flags


@dataclass
class LLMConfig(ServiceConfig):
    port: int = 50052
    tokenizer_path: str | None = None  # when not in the checkpoint folder (structured output needs it)
    engine: EngineConfig = field(default_factory=EngineConfig)  # validated by its own __post_init__

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> LLMConfig:
        p = argparse.ArgumentParser(prog="python -m llm_service", description="mmserve LLM service (gRPC)")
        flags = service_flags(p, cls, "LLM")
        flags.add("tokenizer_path", "TOKENIZER_PATH", help="tokenizer folder", flag="--tokenizer")
        _engine_flags(EnvFlags(p, EngineConfig))
        return cls(**_with_engine(parse_service_args(p, argv)))


def _engine_flags(flags: EnvFlags) -> None:
    """The embedded EngineConfig's flags: --max-running / LLM_MAX_RUNNING set engine.max_running."""
    flags.add("max_waiting", "LLM_MAX_WAITING", int, "queue bound before RESOURCE_EXHAUSTED")
    flags.add("max_running", "LLM_MAX_RUNNING", int, "sequences generating at once")
    flags.add("max_model_len", "MAX_MODEL_LEN", int, "tokens per sequence, 0 = model default")
    flags.add(
        "max_num_batched_tokens", "LLM_MAX_NUM_BATCHED_TOKENS", int, "tokens per step (prefill chunk budget)"
    )
    flags.add("kv_cache_bytes", "LLM_KV_CACHE_BYTES", int, "KV cache budget in bytes, 0 = auto")
    flags.add("block_size", "LLM_BLOCK_SIZE", int, "tokens per KV block")
    flags.switch("disable_prefix_caching", "LLM_DISABLE_PREFIX_CACHING", "turn the prefix cache off")
    flags.add("attention_backend", "LLM_ATTENTION_BACKEND", help="auto|sdpa|flash_attn")
    flags.add("decode_staging_bytes", "LLM_DECODE_STAGING_BYTES", int, "sdpa decode staging budget, 0 = off")
    flags.add("compile", "LLM_COMPILE", help="auto|on|off: torch.compile the decode step (auto: sdpa on CPU)")


def _with_engine(args: dict) -> dict:
    """Parsed flags -> LLMConfig's fields, the engine's gathered into its EngineConfig."""
    names = {f.name for f in fields(EngineConfig)}
    engine = {name: args.pop(name) for name in names & args.keys()}
    engine["enable_prefix_caching"] = not args.pop("disable_prefix_caching")
    return {**args, "engine": EngineConfig(**engine)}
