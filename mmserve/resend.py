"""Hash-only resend (vision.proto, Embed): the metadata naming a replica's cache, and the client's memory.

A client sends only the content hash of an image it believes the answering vision replica holds; a
replica that does not answers NOT_FOUND and the client resends the bytes. The load balancer of the
client's channel (round_robin over every address of `dns:///name`) picks the replica of each call, so
the client cannot know ahead where a call lands: it learns after each call which replica answered
(CACHE_ID_METADATA) and sends an image hash-only only when every replica heard from lately holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from mmserve.wire import PixelLimits

# Initial metadata of every Embed answer, errors included: the id of the answering replica's embedding
# cache, new each time a replica starts (a restarted replica holds nothing the old one was given).
CACHE_ID_METADATA = "mmserve-cache-id"

SentImage = tuple[str, PixelLimits]  # (content hash, the request's resize bounds): one cache entry


@dataclass
class _Replica:
    sent: OrderedDict[SentImage, None] = field(default_factory=OrderedDict)  # LRU, oldest first
    last_heard: int = 0  # the call count when it last answered


class ReplicaMemory:
    """The images each vision replica (by cache id) was given lately.

    `forget_after` calls without an answer from a replica and it is taken for gone (scaled down, or
    restarted under a new id); it no longer holds hash-only sends back. A replica serving an older
    protocol sends no id: all of those count as one replica (id "")."""

    def __init__(self, remember: int = 4096, forget_after: int = 64):
        self._replicas: dict[str, _Replica] = {}
        self._remember = remember
        self._forget_after = forget_after
        self._calls = 0

    def __len__(self) -> int:  # replicas heard from lately
        return len(self._replicas)

    def held_everywhere(self, image: SentImage) -> bool:
        """Whether an image may go hash-only: every replica heard from lately was given it."""
        return bool(self._replicas) and all(image in r.sent for r in self._replicas.values())

    def answered(self, cache_id: str, images: Iterable[SentImage]) -> None:
        """Replica `cache_id` answered a call for `images`: it holds them now."""
        sent = self._heard(cache_id).sent
        for image in images:
            sent[image] = None
            sent.move_to_end(image)
        while len(sent) > self._remember:
            sent.popitem(last=False)

    def not_found(self, cache_id: str) -> None:
        """Replica `cache_id` lacked an image it was given (evicted): what we remember of it is stale."""
        self._heard(cache_id).sent.clear()

    def _heard(self, cache_id: str) -> _Replica:
        self._calls += 1
        replica = self._replicas.setdefault(cache_id, _Replica())
        replica.last_heard = self._calls
        gone = [key for key, r in self._replicas.items() if self._calls - r.last_heard > self._forget_after]
        for key in gone:
            del self._replicas[key]
        return replica
