"""The `model_name` and `replica` labels on every sample a process serves on /metrics: one Prometheus
scraping many replicas (compose --scale, a Kubernetes Deployment) of several models can then tell them
apart and aggregate over them, whatever each metric's own labels are."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REPLICA_ENV = "MMSERVE_REPLICA"
LABEL_NAMES = ("model_name", "replica")


def default_replica() -> str:
    """$MMSERVE_REPLICA, else the host name: a container's id in compose, the pod's name in Kubernetes."""
    return os.environ.get(REPLICA_ENV) or socket.gethostname()


def label_values(model_name: str, replica: str = "") -> dict[str, str]:
    """The labels (an empty `replica` is the default one)."""
    return {"model_name": model_name, "replica": replica or default_replica()}


class _WithLabels(Collector):
    """`source`'s families, each sample with `labels` added: read at each scrape, so a metric registered
    on `source` later (or a new label value) carries them too."""

    def __init__(self, source: CollectorRegistry, labels: dict[str, str]):
        self.source = source
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            clash = self.labels.keys() & {name for sample in family.samples for name in sample.labels}
            assert not clash, f"{family.name} has its own {sorted(clash)} label"
            labeled = copy.copy(family)  # a new sample list: the source's family stays as it was
            labeled.samples = [
                sample._replace(labels={**sample.labels, **self.labels}) for sample in family.samples
            ]
            yield labeled


def with_labels(source: CollectorRegistry, labels: dict[str, str]) -> CollectorRegistry:
    """A registry to serve instead of `source`: the same metrics, every sample carrying `labels`.
    (It does not describe its names, so prometheus_client's ?name[]= filter reads it whole, then filters.)"""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WithLabels(source, labels))
    return registry
