"""Configuration of the LLM service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from mmserve.checkpoint import check_model_dtype
from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES


@dataclass
class LLMConfig:
    checkpoint: str  # model folder (config.json + safetensors)
    model_type: str | None = None  # family override (MODEL_TYPE); None = decide from config.json
    host: str = "127.0.0.1"
    port: int = 50052
    dtype: str = "float32"  # weights and activations
    device: str = "cpu"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send/receive limit
    max_waiting: int = 256  # requests queued beyond this get RESOURCE_EXHAUSTED
    max_running: int = 8  # sequences generating at once (each holds its own KV cache)
    max_model_len: int = 0  # prompt + output cap per sequence; 0 = the model's max_position_embeddings
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    threads: int = 0  # torch intra-op threads for the engine; 0 = torch's default (all cores)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        check_model_dtype(self.dtype)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_waiting < 1 or self.max_running < 1 or self.max_model_len < 0:
            raise ValueError("max_waiting and max_running must be >= 1, max_model_len >= 0")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> LLMConfig:
        env = os.environ.get
        p = argparse.ArgumentParser(prog="python -m llm_service", description="mmserve LLM service (gRPC)")
        p.add_argument("--checkpoint", default=env("CHECKPOINT_PATH"), help="model folder [CHECKPOINT_PATH]")
        p.add_argument(
            "--model-type", default=env("MODEL_TYPE"), help="family override, e.g. llava [MODEL_TYPE]"
        )
        p.add_argument("--host", default=env("LLM_HOST", "127.0.0.1"), help="bind address [LLM_HOST]")
        p.add_argument("--port", type=int, default=int(env("LLM_PORT", "50052")), help="gRPC port [LLM_PORT]")
        p.add_argument(
            "--dtype", default=env("LLM_DTYPE", "float32"), help="float32|bfloat16|float16 [LLM_DTYPE]"
        )
        p.add_argument("--device", default=env("LLM_DEVICE", "cpu"), help="torch device [LLM_DEVICE]")
        p.add_argument(
            "--max-message-bytes",
            type=int,
            default=int(env("GRPC_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)),
            help="gRPC message size limit [GRPC_MAX_MESSAGE_BYTES]",
        )
        p.add_argument(
            "--max-waiting",
            type=int,
            default=int(env("LLM_MAX_WAITING", "256")),
            help="queue bound before RESOURCE_EXHAUSTED [LLM_MAX_WAITING]",
        )
        p.add_argument(
            "--max-running",
            type=int,
            default=int(env("LLM_MAX_RUNNING", "8")),
            help="sequences generating at once [LLM_MAX_RUNNING]",
        )
        p.add_argument(
            "--max-model-len",
            type=int,
            default=int(env("MAX_MODEL_LEN", "0")),
            help="tokens per sequence, 0 = model default [MAX_MODEL_LEN]",
        )
        p.add_argument(
            "--threads", type=int, default=int(env("LLM_THREADS", "0")), help="torch threads [LLM_THREADS]"
        )
        p.add_argument(
            "--metrics-port",
            type=int,
            default=int(env("LLM_METRICS_PORT", "0")),
            help="Prometheus /metrics port, 0 = off [LLM_METRICS_PORT]",
        )
        args = p.parse_args(argv)
        if not args.checkpoint:
            p.error("--checkpoint (or CHECKPOINT_PATH) is required")
        return cls(**vars(args))
