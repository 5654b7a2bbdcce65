"""The embedding cache: LRU over content-addressed keys with a byte budget (event-loop thread only)."""

from __future__ import annotations

from collections import OrderedDict

from mmserve.wire import ImageFeatures


class EmbeddingCache:
    def __init__(self, budget_bytes: int, metrics=None):
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:  # no recency update, no metrics
        return key in self._entries

    @staticmethod
    def size_of(features: ImageFeatures) -> int:
        return features.embedding.numel() * features.embedding.element_size()

    def get(self, key: str) -> ImageFeatures | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        if self._metrics is not None:
            (self._metrics.cache_hits if features is not None else self._metrics.cache_misses).inc()
        return features

    def put(self, key: str, features: ImageFeatures) -> None:
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
