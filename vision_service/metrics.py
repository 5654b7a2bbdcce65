"""Prometheus metrics of the vision service (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Every outcome an image can end with; each series exists from the start (at 0), so a reader can tell
# "none yet" from a misspelt or renamed outcome.
IMAGE_OUTCOMES = ("encoded", "cached", "coalesced", "invalid", "expired", "abandoned")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class VisionMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.images = Counter(
            "mmserve_vision_images",
            "Images by outcome (" + ", ".join(IMAGE_OUTCOMES) + ")",
            ["outcome"],
            registry=r,
        )
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome)
        self.queue_time = Histogram(
            "mmserve_vision_queue_seconds", "Preprocessed to encoder start", buckets=_SECONDS, registry=r
        )
        self.preprocess = Histogram(
            "mmserve_vision_preprocess_seconds", "Decode + preprocess per image", buckets=_SECONDS, registry=r
        )
        self.encode = Histogram(
            "mmserve_vision_encode_seconds", "Encoder forward per batch", buckets=_SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "mmserve_vision_batch_size",
            "Images per encoder forward",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.cache_hits = Counter("mmserve_vision_cache_hits", "Embedding cache hits", registry=r)
        self.cache_misses = Counter("mmserve_vision_cache_misses", "Embedding cache misses", registry=r)
        self.cache_evictions = Counter(
            "mmserve_vision_cache_evictions", "Embedding cache evictions", registry=r
        )
        self.cache_bytes = Gauge(
            "mmserve_vision_cache_bytes", "Bytes held by the embedding cache", registry=r
        )
