"""Configuration of the vision service process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from mmserve.images import DEFAULT_MAX_IMAGE_PIXELS
from mmserve.service_config import ServiceConfig, parse_service_args, service_flags


@dataclass
class VisionConfig(ServiceConfig):
    """The shared service fields (mmserve.service_config: checkpoint, host, dtype of the tower and its
    embeddings, metrics port, threads, drain timeout, ...) and the vision service's own."""

    port: int = 50051
    max_images_per_request: int = 32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # checked from the header, before decoding
    # Dynamic-resolution families (Qwen2-VL): bounds of a resized image's area, the default of requests
    # that set none; 0 = the checkpoint's preprocessor config.
    min_pixels: int = 0
    max_pixels: int = 0
    max_batch_size: int = 16  # images per encoder forward, across requests
    max_queued_images: int = 1024  # distinct images being preprocessed, queued or encoded; more: 429
    max_batch_patches: int = 16384  # encoder patches per forward (dynamic-resolution families)
    max_wait_ms: float = 2.0  # how long a forward waits for more images once one is queued
    cache_bytes: int = 1 << 30  # embedding cache budget (LRU); 0 turns the cache off
    # Decode + resize + normalise workers. The encoder forward is the bottleneck and uses every core,
    # so preprocessing gets half of them (measured in benchmarks/RESULTS.md).
    preprocess_workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    preprocess_mode: str = "thread"  # "thread" or "process" (see benchmarks/RESULTS.md for which wins)
    compile: bool = False  # torch.compile the vision tower (slower start-up, faster forwards on CPU)

    def __post_init__(self):
        super().__post_init__()
        if self.max_images_per_request < 1 or self.max_image_pixels < 1:
            raise ValueError("max_images_per_request and max_image_pixels must be positive")
        if self.min_pixels < 0 or self.max_pixels < 0:
            raise ValueError("min_pixels and max_pixels must be >= 0 (0 = the checkpoint's default)")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if (
            self.max_batch_size < 1
            or self.max_queued_images < 1
            or self.max_wait_ms < 0
            or self.cache_bytes < 0
            or self.preprocess_workers < 1
        ):
            raise ValueError(
                "max_batch_size, max_queued_images and preprocess_workers must be >= 1, "
                "max_wait_ms and cache_bytes >= 0"
            )
        if self.preprocess_mode not in ("thread", "process"):
            raise ValueError(f"preprocess_mode must be 'thread' or 'process', got {self.preprocess_mode!r}")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> VisionConfig:
        p = argparse.ArgumentParser(
            prog="python -m vision_service", description="mmserve vision service (gRPC)"
        )
        flags = service_flags(p, cls, "VISION")
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
        flags.add(
            "max_queued_images", "VISION_MAX_QUEUED_IMAGES", int, "images in work at once; more get 429"
        )
        flags.add("max_wait_ms", "VISION_MAX_WAIT_MS", float, "wait for more images before a forward")
        flags.add("cache_bytes", "VISION_CACHE_BYTES", int, "embedding cache budget in bytes, 0 = off")
        flags.add("preprocess_workers", "VISION_PREPROCESS_WORKERS", int, "decode/preprocess workers")
        flags.add("preprocess_mode", "VISION_PREPROCESS_MODE", help="thread|process")
        flags.switch("compile", "VISION_COMPILE", "torch.compile the vision tower; compiles at start-up")
        return cls(**parse_service_args(p, argv))
