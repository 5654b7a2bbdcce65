"""Configuration of the LLM service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from llm_service.engine.llm_engine import EngineConfig
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
    max_waiting: int = 256  # requests queued beyond this get RESOURCE_EXHAUSTED
    max_running: int = 128  # sequences in the running batch at once
    max_model_len: int = 0  # prompt + output cap per sequence; 0 = the model's (and the KV cache's) limit
    max_num_batched_tokens: int = 2048  # tokens computed per step: the chunked-prefill budget
    kv_cache_bytes: int = 0  # paged KV cache budget; 0 = 2 GiB on CPU, 90% of free memory on CUDA
    block_size: int = 16  # tokens per KV block (the flash_attn backend uses 256)
    disable_prefix_caching: bool = False
    attention_backend: str = "auto"  # auto (flash_attn on CUDA when installed, else sdpa) | sdpa | flash_attn
    decode_staging_bytes: int = (
        512 << 20
    )  # sdpa backend: contiguous copies of decoding sequences' KV; 0 = off
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    threads: int = 0  # torch intra-op threads for the engine; 0 = torch's default (all cores)
    drain_timeout_s: float = 30.0  # on SIGTERM: seconds in-flight calls get to finish (NOT_SERVING meanwhile)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        check_model_dtype(self.dtype)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        self.engine_config()  # validates the engine's fields

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_waiting=self.max_waiting,
            max_running=self.max_running,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_bytes=self.kv_cache_bytes,
            block_size=self.block_size,
            enable_prefix_caching=not self.disable_prefix_caching,
            attention_backend=self.attention_backend,
            decode_staging_bytes=self.decode_staging_bytes,
        )

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> LLMConfig:
        p = argparse.ArgumentParser(prog="python -m llm_service", description="mmserve LLM service (gRPC)")
        flags = EnvFlags(p, cls)
        flags.add("checkpoint", "CHECKPOINT_PATH", help="model folder")
        flags.add("model_type", "MODEL_TYPE", help="family override, e.g. llava")
        flags.add("host", "LLM_HOST", help="bind address")
        flags.add("port", "LLM_PORT", int, "gRPC port")
        flags.add("dtype", "LLM_DTYPE", help="auto|float32|bfloat16|float16 (auto: the checkpoint's)")
        flags.add("device", "LLM_DEVICE", help="torch device")
        flags.add("max_message_bytes", "GRPC_MAX_MESSAGE_BYTES", int, "gRPC message size limit")
        flags.add("max_waiting", "LLM_MAX_WAITING", int, "queue bound before RESOURCE_EXHAUSTED")
        flags.add("max_running", "LLM_MAX_RUNNING", int, "sequences generating at once")
        flags.add("max_model_len", "MAX_MODEL_LEN", int, "tokens per sequence, 0 = model default")
        flags.add(
            "max_num_batched_tokens",
            "LLM_MAX_NUM_BATCHED_TOKENS",
            int,
            "tokens per step (prefill chunk budget)",
        )
        flags.add("kv_cache_bytes", "LLM_KV_CACHE_BYTES", int, "KV cache budget in bytes, 0 = auto")
        flags.add("block_size", "LLM_BLOCK_SIZE", int, "tokens per KV block")
        flags.switch("disable_prefix_caching", "LLM_DISABLE_PREFIX_CACHING", "turn the prefix cache off")
        flags.add("attention_backend", "LLM_ATTENTION_BACKEND", help="auto|sdpa|flash_attn")
        flags.add(
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
        return cls(**vars(args))
