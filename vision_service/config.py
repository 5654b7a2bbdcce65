"""Configuration of the vision service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES
from mmserve.images import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class VisionConfig:
    checkpoint: str  # model folder (config.json + safetensors + preprocessor config)
    model_type: str | None = None  # family override (MODEL_TYPE); None = decide from config.json
    host: str = "127.0.0.1"
    port: int = 50051
    dtype: str = "float32"  # dtype of the tower and of the embeddings it returns
    device: str = "cpu"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send/receive limit
    max_images_per_request: int = 32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # checked from the header, before decoding
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_images_per_request < 1 or self.max_image_pixels < 1:
            raise ValueError("max_images_per_request and max_image_pixels must be positive")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> VisionConfig:
        env = os.environ.get
        p = argparse.ArgumentParser(
            prog="python -m vision_service", description="mmserve vision service (gRPC)"
        )
        p.add_argument("--checkpoint", default=env("CHECKPOINT_PATH"), help="model folder [CHECKPOINT_PATH]")
        p.add_argument(
            "--model-type", default=env("MODEL_TYPE"), help="family override, e.g. llava [MODEL_TYPE]"
        )
        p.add_argument("--host", default=env("VISION_HOST", "127.0.0.1"), help="bind address [VISION_HOST]")
        p.add_argument(
            "--port", type=int, default=int(env("VISION_PORT", "50051")), help="gRPC port [VISION_PORT]"
        )
        p.add_argument(
            "--dtype", default=env("VISION_DTYPE", "float32"), help="float32|bfloat16|float16 [VISION_DTYPE]"
        )
        p.add_argument("--device", default=env("VISION_DEVICE", "cpu"), help="torch device [VISION_DEVICE]")
        p.add_argument(
            "--max-message-bytes",
            type=int,
            default=int(env("GRPC_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)),
            help="gRPC message size limit [GRPC_MAX_MESSAGE_BYTES]",
        )
        p.add_argument(
            "--max-image-pixels",
            type=int,
            default=int(env("MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)),
            help="reject larger images before decoding [MAX_IMAGE_PIXELS]",
        )
        p.add_argument(
            "--threads",
            type=int,
            default=int(env("VISION_THREADS", "0")),
            help="torch threads [VISION_THREADS]",
        )
        p.add_argument(
            "--metrics-port",
            type=int,
            default=int(env("VISION_METRICS_PORT", "0")),
            help="Prometheus /metrics port, 0 = off [VISION_METRICS_PORT]",
        )
        args = p.parse_args(argv)
        if not args.checkpoint:
            p.error("--checkpoint (or CHECKPOINT_PATH) is required")
        return cls(**{k: v for k, v in vars(args).items()})
