"""Configuration of the vision service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from mmserve.checkpoint import check_model_dtype
from mmserve.cli import EnvFlags
from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES
from mmserve.images import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class VisionConfig:
    checkpoint: str  # model folder (config.json + safetensors + preprocessor config)
    model_type: str | None = None  # family override (MODEL_TYPE); None = decide from config.json
    host: str = "127.0.0.1"
    port: int = 50051
    dtype: str = (
        "auto"  # of the tower and its embeddings; auto = the checkpoint's (float16 -> bfloat16 on CPU)
    )
    device: str = "cpu"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send/receive limit
    max_images_per_request: int = 32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # checked from the header, before decoding
    # Dynamic-resolution families (Qwen2-VL): bounds of a resized image's area, the default of requests
    # that set none; 0 = the checkpoint's preprocessor config.
    min_pixels: int = 0
    max_pixels: int = 0
    max_batch_size: int = 16  # images per encoder forward, across requests
    max_batch_patches: int = 16384  # encoder patches per forward (dynamic-resolution families)
    max_wait_ms: float = 2.0  # how long a forward waits for more images once one is queued
    cache_bytes: int = 1 << 30  # embedding cache budget (LRU); 0 turns the cache off
    # Decode + resize + normalise workers. The encoder forward is the bottleneck and uses every core,
    # so preprocessing gets half of them (measured in benchmarks/RESULTS.md).
    preprocess_workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    preprocess_mode: str = "thread"  # "thread" or "process" (see benchmarks/RESULTS.md for which wins)
    compile: bool = False  # torch.compile the vision tower (slower start-up, faster forwards on CPU)
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    drain_timeout_s: float = 30.0  # on SIGTERM: seconds in-flight calls get to finish (NOT_SERVING meanwhile)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        check_model_dtype(self.dtype)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_images_per_request < 1 or self.max_image_pixels < 1:
            raise ValueError("max_images_per_request and max_image_pixels must be positive")
        if self.min_pixels < 0 or self.max_pixels < 0:
            raise ValueError("min_pixels and max_pixels must be >= 0 (0 = the checkpoint's default)")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if (
            self.max_batch_size < 1
            or self.max_wait_ms < 0
            or self.cache_bytes < 0
            or self.preprocess_workers < 1
        ):
            raise ValueError(
                "max_batch_size and preprocess_workers must be >= 1, max_wait_ms and cache_bytes >= 0"
            )
        if self.preprocess_mode not in ("thread", "process"):
            raise ValueError(f"preprocess_mode must be 'thread' or 'process', got {self.preprocess_mode!r}")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> VisionConfig:
        p = argparse.ArgumentParser(
            prog="python -m vision_service", description="mmserve vision service (gRPC)"
        )
        flags = EnvFlags(p, cls)
        flags.add("checkpoint", "CHECKPOINT_PATH", help="model folder")
        flags.add("model_type", "MODEL_TYPE", help="family override, e.g. llava")
        flags.add("host", "VISION_HOST", help="bind address")
        flags.add("port", "VISION_PORT", int, "gRPC port")
        flags.add("dtype", "VISION_DTYPE", help="auto|float32|bfloat16|float16 (auto: the checkpoint's)")
        flags.add("device", "VISION_DEVICE", help="torch device")
        flags.add("max_message_bytes", "GRPC_MAX_MESSAGE_BYTES", int, "gRPC message size limit")
        flags.add("max_images_per_request", "VISION_MAX_IMAGES_PER_REQUEST", int, "images per Embed call")
        flags.add("max_image_pixels", "MAX_IMAGE_PIXELS", int, "reject larger images before decoding")
        flags.add(
            "min_pixels", "VISION_MIN_PIXELS", int, "Qwen2-VL: min resized image area, 0 = checkpoint's"
        )
        flags.add(
            "max_pixels", "VISION_MAX_PIXELS", int, "Qwen2-VL: max resized image area, 0 = checkpoint's"
        )
        flags.add("max_batch_size", "VISION_MAX_BATCH_SIZE", int, "images per encoder forward")
        flags.add(
            "max_batch_patches", "VISION_MAX_BATCH_PATCHES", int, "patches per forward (Qwen2-VL family)"
        )
        flags.add("max_wait_ms", "VISION_MAX_WAIT_MS", float, "wait for more images before a forward")
        flags.add("cache_bytes", "VISION_CACHE_BYTES", int, "embedding cache budget in bytes, 0 = off")
        flags.add("preprocess_workers", "VISION_PREPROCESS_WORKERS", int, "decode/preprocess workers")
        flags.add("preprocess_mode", "VISION_PREPROCESS_MODE", help="thread|process")
        flags.add("metrics_port", "VISION_METRICS_PORT", int, "Prometheus /metrics port, 0 = off")
        flags.add(
            "drain_timeout_s",
            "DRAIN_TIMEOUT",
            float,
            "seconds in-flight calls get to finish after SIGTERM",
            flag="--drain-timeout",
        )
        flags.switch("compile", "VISION_COMPILE", "torch.compile the vision tower; compiles at start-up")
        args = p.parse_args(argv)
        if not args.checkpoint:
            p.error("--checkpoint (or CHECKPOINT_PATH) is required")
        return cls(**vars(args))
