"""The embedding cache: LRU over structured keys with a byte budget (event-loop thread only)."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

from mmserve.wire import ImageFeatures, PixelLimits
from vision_service.metrics import VisionMetrics


@dataclass(frozen=True)
class EmbeddingKey:
    """Everything one embedding depends on: the same bytes resized to other bounds are another
    embedding (another N_i), and another model's embedding is no answer at all."""

    model: str  # model_fingerprint(): the weights' config, the preprocessing config and the dtype
    content_hash: str  # hex SHA-256 of the image bytes
    resize: PixelLimits = PixelLimits()  # the bounds preprocess_one was given; None = the checkpoint's


class EmbeddingCache:
    def __init__(self, budget_bytes: int, metrics: VisionMetrics | None = None):
        # Names this cache to clients (mmserve.resend): a restarted service is a new cache holding none
        # of the images the old one was given.
        self.id = uuid.uuid4().hex
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[EmbeddingKey, ImageFeatures] = OrderedDict()
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: EmbeddingKey) -> bool:  # no recency update, no metrics
        return key in self._entries

    @staticmethod
    def size_of(features: ImageFeatures) -> int:
        return features.embedding.numel() * features.embedding.element_size()

    def get(self, key: EmbeddingKey) -> ImageFeatures | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        if self._metrics is not None:
            (self._metrics.cache_hits if features is not None else self._metrics.cache_misses).inc()
        return features

    def put(self, key: EmbeddingKey, features: ImageFeatures) -> None:
        size = self.size_of(features)
        if size > self.budget or key in self._entries:
            return
        while self.bytes + size > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= self.size_of(evicted)
            if self._metrics is not None:
                self._metrics.cache_evictions.inc()
        self._entries[key] = features
        self.bytes += size
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self.bytes)
