"""Configuration of the LLM service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

from llm_service.engine.config import EngineConfig
from mmserve.checkpoint import check_model_dtype
from mmserve.cli import EnvFlags
from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES


@dataclass
class LLMConfig:
    checkpoint: str  # model folder (config.json + safetensors)
    model_type: str | None = None  # family override (MODEL_TYPE); None = decide from config.json
    host: str = "127.0.0.1"
    port: int = 50052
    dtype: str = "auto"  # weights and activations; auto = the checkpoint's (float16 -> bfloat16 on CPU)
    device: str = "cpu"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send/receive limit
    engine: EngineConfig = field(default_factory=EngineConfig)  # validated by its own __post_init__
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    threads: int = 0  # torch intra-op threads for the engine; 0 = torch's default (all cores)
    drain_timeout_s: float = 30.0  # on SIGTERM: seconds in-flight calls get to finish (NOT_SERVING meanwhile)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        check_model_dtype(self.dtype)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    def engine_config(self) -> EngineConfig:
        """Kept until llm_service/__main__.py and pipeline/ read `engine` directly."""
        return self.engine

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> LLMConfig:
        p = argparse.ArgumentParser(prog="python -m llm_service", description="mmserve LLM service (gRPC)")
        flags = EnvFlags(p, cls)
        engine_flags = EnvFlags(p, EngineConfig)  # the same parser: flags of the embedded engine config
        flags.add("checkpoint", "CHECKPOINT_PATH", help="model folder")
        flags.add("model_type", "MODEL_TYPE", help="family override, e.g. llava")
        flags.add("host", "LLM_HOST", help="bind address")
        flags.add("port", "LLM_PORT", int, "gRPC port")
        flags.add("dtype", "LLM_DTYPE", help="auto|float32|bfloat16|float16 (auto: the checkpoint's)")
        flags.add("device", "LLM_DEVICE", help="torch device")
        flags.add("max_message_bytes", "GRPC_MAX_MESSAGE_BYTES", int, "gRPC message size limit")
        engine_flags.add("max_waiting", "LLM_MAX_WAITING", int, "queue bound before RESOURCE_EXHAUSTED")
        engine_flags.add("max_running", "LLM_MAX_RUNNING", int, "sequences generating at once")
        engine_flags.add("max_model_len", "MAX_MODEL_LEN", int, "tokens per sequence, 0 = model default")
        engine_flags.add(
            "max_num_batched_tokens",
            "LLM_MAX_NUM_BATCHED_TOKENS",
            int,
            "tokens per step (prefill chunk budget)",
        )
        engine_flags.add("kv_cache_bytes", "LLM_KV_CACHE_BYTES", int, "KV cache budget in bytes, 0 = auto")
        engine_flags.add("block_size", "LLM_BLOCK_SIZE", int, "tokens per KV block")
        engine_flags.switch(
            "disable_prefix_caching", "LLM_DISABLE_PREFIX_CACHING", "turn the prefix cache off"
        )
        engine_flags.add("attention_backend", "LLM_ATTENTION_BACKEND", help="auto|sdpa|flash_attn")
        engine_flags.add(
            "decode_staging_bytes", "LLM_DECODE_STAGING_BYTES", int, "sdpa decode staging budget, 0 = off"
        )
        flags.add("threads", "LLM_THREADS", int, "torch threads, 0 = all cores")
        flags.add(
            "drain_timeout_s",
            "DRAIN_TIMEOUT",
            float,
            "seconds in-flight calls get to finish after SIGTERM",
            flag="--drain-timeout",
        )
        flags.add("metrics_port", "LLM_METRICS_PORT", int, "Prometheus /metrics port, 0 = off")
        args = p.parse_args(argv)
        if not args.checkpoint:
            p.error("--checkpoint (or CHECKPOINT_PATH) is required")
        return cls(**_with_engine(vars(args)))


def _with_engine(args: dict) -> dict:
    """Parsed flags -> LLMConfig's fields, the engine's gathered into its EngineConfig."""
    names = {f.name for f in fields(EngineConfig)}
    engine = {name: args.pop(name) for name in names & args.keys()}
    engine["enable_prefix_caching"] = not args.pop("disable_prefix_caching")
    return {**args, "engine": EngineConfig(**engine)}
