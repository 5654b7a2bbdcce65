"""Prometheus metrics of the vision service (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class VisionMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.images = Counter("mmserve_vision_images", "Images by outcome", ["outcome"], registry=r)
        self.preprocess = Histogram(
            "mmserve_vision_preprocess_seconds", "Decode + preprocess per request", registry=r
        )
        self.encode = Histogram("mmserve_vision_encode_seconds", "Encoder forward per batch", registry=r)
        self.batch_size = Histogram(
            "mmserve_vision_batch_size",
            "Images per encoder forward",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
