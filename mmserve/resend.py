"""Hash-only resend (vision.proto, Embed): the metadata naming a replica's cache, and the client's memory.

A client sends only the content hash of an image it believes the replica it calls holds; a replica
that does not answers NOT_FOUND and the client resends the bytes. The client picks the replica of each
call (gateway.replicas) and learns from each answer which cache answered (CACHE_ID_METADATA: a
restarted replica at the same address answers with a new id, holding nothing the old one was given).
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
    restarted under a new id): what it was given is forgotten. A replica serving an older protocol
    sends no id (id "")."""

    def __init__(self, remember: int = 4096, forget_after: int = 64):
        self._replicas: dict[str, _Replica] = {}
        self._remember = remember
        self._forget_after = forget_after
        self._calls = 0

    def __len__(self) -> int:  # replicas heard from lately
        return len(self._replicas)

    def holds(self, cache_id: str | None, image: SentImage) -> bool:
        """Whether an image may go hash-only to the replica whose cache is `cache_id` (None: not known
        yet: it has not answered this client)."""
        replica = self._replicas.get(cache_id) if cache_id is not None else None
        return replica is not None and image in replica.sent

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
