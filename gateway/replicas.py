"""The replicas behind one backend address, their health, and the replica each call goes to.

A backend address names one replica or many: a list (`a:50052,b:50052`, gRPC's `ipv4:a:p,b:p`), or a DNS
name that resolves to several addresses (a Kubernetes headless Service, a compose service scaled up;
`dns:///name:port` or plain `name:port`). The pool resolves names again every few seconds, keeps one
channel per replica address, and asks each replica's grpc.health.v1 service in the background: a
replica that stops answering SERVING leaves the pool, and comes back once it answers again. A call that
fails to reach a replica takes it out at once (mark_failed), without waiting for the next check.

Which replica serves a call is the policy's choice (`choose`):
- "cache_aware" (the default): requests sharing a prompt's beginning (a routing key) reach the
  replica whose prefix cache holds it. Each replica remembers the RECENT_KEYS latest keys sent to it; a
  key seen before goes to the least loaded replica holding it, a new key to the replica holding the
  fewest keys (so a few hot keys spread over the replicas instead of piling on whichever a hash picks),
  then the least loaded, then its rendezvous-hash owner (the same on every gateway while loads are
  even). When that replica already has `max_imbalance` more calls in flight from this gateway than the
  least loaded one, and more than BALANCE_RATIO times as many (the two thresholds of SGLang's and vLLM's
  cache-aware routers), the least loaded serves instead and holds the key too, so later requests with
  that key go to the less loaded of the two.
- "least_loaded": the fewest calls in flight from this gateway; "round_robin": each in turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mmserve.errors import UnavailableError
from mmserve.grpc_util import channel_options

log = logging.getLogger(__name__)
RECENT_KEYS = 4096  # routing keys each replica remembers (cache_aware), least recently sent dropped first
BALANCE_RATIO = 1.5  # cache_aware passes a replica over only when it has this many times the least load

POLICIES = ("cache_aware", "least_loaded", "round_robin")
HEALTH_TIMEOUT_S = 2.0
_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Endpoint:
    """One entry of a backend address: a host (name or IP) and port, or a target gRPC takes as it is."""

    host: str
    port: int = 0
    literal: str = ""  # unix:/path and the like: one replica, not resolved here

    @property
    def resolvable(self) -> bool:
        if self.literal:
            return False
        try:
            ipaddress.ip_address(self.host)
            return False
        except ValueError:
            return True


def parse_address(spec: str) -> list[Endpoint]:
    """`a:p`, `a:p,b:p`, `[v6]:p`, `dns:///name:p`, `ipv4:a:p,b:p`, `ipv6:[a]:p,...`, `unix:/path`."""
    text = spec.strip()
    if not text:
        raise ValueError("empty backend address")
    if text.startswith(("unix:", "unix-abstract:", "vsock:")):
        return [Endpoint(host="", literal=text)]
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        text = text.removeprefix(prefix)
    endpoints = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"backend address {entry!r} (in {spec!r}) is not host:port")
        endpoints.append(Endpoint(host, int(port)))
    if not endpoints:
        raise ValueError(f"backend address {spec!r} names no host:port")
    return endpoints


def _target(host: str, port: int) -> str:
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


@dataclass
class Replica:
    name: str  # "10.0.0.5:50052": the address it was reached at
    channel: grpc.aio.Channel
    healthy: bool | None = None  # None: not checked yet (used, so that starting is not delayed)
    status: str = "UNKNOWN"  # the last health answer, or why the replica is out
    in_flight: int = 0
    calls: int = 0  # calls sent to it, in all
    retired: bool = False  # its address no longer resolves: no new calls, closed once idle
    cache_id: str | None = None  # vision: the id of the embedding cache it last answered with
    # cache_aware: the routing keys sent here lately, oldest first (what its prefix cache likely holds)
    recent_keys: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def remember(self, key: bytes) -> None:
        self.recent_keys[key] = None
        self.recent_keys.move_to_end(key)
        if len(self.recent_keys) > RECENT_KEYS:
            self.recent_keys.popitem(last=False)


def rendezvous(key: bytes, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest(), "big")


@dataclass
class ReplicaPool:
    """The replicas of one service (`service`: "vision" or "llm", for messages and metrics)."""

    service: str
    address: str
    max_message_bytes: int
    policy: str = "cache_aware"
    max_imbalance: int = 8
    check_interval_s: float = 2.0
    replicas: dict[str, Replica] = field(default_factory=dict, init=False)
    _endpoints: list[Endpoint] = field(default_factory=list, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _turn: Iterator[int] = field(default_factory=itertools.count, init=False)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"routing policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        self._endpoints = parse_address(self.address)
        self._sync(self._resolve_now())

    # ---- membership --------------------------------------------------------------------------------

    def _resolve_now(self) -> dict[str, str]:
        """name -> gRPC target of every replica the address names now (blocking: start-up only)."""
        found: dict[str, str] = {}
        for endpoint in self._endpoints:
            found.update(_expand(endpoint, _lookup(endpoint) if endpoint.resolvable else None))
        return found

    async def _resolve(self) -> dict[str, str] | None:
        """As _resolve_now, without blocking the loop; None when a name does not resolve right now
        (a DNS hiccup must not empty the pool)."""
        loop, found = asyncio.get_running_loop(), {}
        for endpoint in self._endpoints:
            infos = None
            if endpoint.resolvable:
                try:
                    infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
                except OSError:
                    return None
            found.update(_expand(endpoint, infos))
        return found

    def _sync(self, found: dict[str, str]) -> None:
        for name, target in found.items():
            if name not in self.replicas:
                options = channel_options(self.max_message_bytes)
                self.replicas[name] = Replica(name, grpc.aio.insecure_channel(target, options=options))
                log.info("%s replica %s joined the pool", self.service, name)
            self.replicas[name].retired = False
        for name, replica in self.replicas.items():
            if name not in found and not replica.retired:
                replica.retired = True
                log.info("%s replica %s no longer resolves: retired once idle", self.service, name)

    async def refresh(self) -> None:
        """Resolve the address again, drop retired replicas that went idle, and check every replica."""
        found = await self._resolve()
        if found is not None:
            self._sync(found)
        for name, replica in list(self.replicas.items()):
            if replica.retired and not replica.in_flight:
                del self.replicas[name]
                await replica.channel.close()
        await asyncio.gather(*(self._check(r) for r in self.replicas.values()))

    async def _check(self, replica: Replica) -> None:
        try:
            stub = health_pb2_grpc.HealthStub(replica.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            healthy = reply.status == _SERVING
        except grpc.aio.AioRpcError as exc:
            status, healthy = exc.code().name, False
        if healthy != replica.healthy and replica.healthy is not None:
            log.warning("%s replica %s %s (%s)", self.service, replica.name, _verb(healthy), status)
        replica.healthy, replica.status = healthy, status

    def mark_failed(self, replica: Replica, reason: str) -> None:
        """A call could not reach `replica`: out of the pool until a health check finds it serving."""
        if replica.healthy is not False:
            log.warning("%s replica %s left the pool (%s)", self.service, replica.name, reason)
        replica.healthy, replica.status = False, reason

    def start(self) -> None:
        """Start the background checks (from inside the event loop; idempotent; none when
        check_interval_s is 0)."""
        if self._task is None and self.check_interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad round
                log.exception("%s replica check failed", self.service)
            await asyncio.sleep(max(0.0, self.check_interval_s - (time.monotonic() - started)))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(r.channel.close() for r in self.replicas.values()))

    # ---- routing -----------------------------------------------------------------------------------

    def states(self) -> dict[str, str]:
        """Each replica's last known state."""
        return {name: ("RETIRED" if r.retired else r.status) for name, r in self.replicas.items()}

    async def check_now(self) -> dict[str, str]:
        """Ask every replica now (/health and /ready answer from this, not from the last round)."""
        self.start()
        await asyncio.gather(*(self._check(r) for r in self.replicas.values() if not r.retired))
        return self.states()

    def serving(self) -> list[Replica]:
        """The replicas new calls may go to: those checked healthy, else those not checked yet."""
        live = [r for r in self.replicas.values() if not r.retired]
        return [r for r in live if r.healthy] or [r for r in live if r.healthy is None]

    def choose(self, key: bytes | None, exclude: Iterable[Replica] = ()) -> Replica:
        self.start()
        skip = {id(r) for r in exclude}
        candidates = [r for r in self.serving() if id(r) not in skip]
        if not candidates:
            states = ", ".join(f"{n}: {s}" for n, s in self.states().items()) or "none resolved"
            raise UnavailableError(f"{self.service} service is unavailable: no replica is serving ({states})")
        least = min(r.in_flight for r in candidates)
        if self.policy == "round_robin":
            return candidates[next(self._turn) % len(candidates)]
        idle = [r for r in candidates if r.in_flight == least]
        if self.policy != "cache_aware" or key is None:
            return idle[next(self._turn) % len(idle)]
        # The replicas this key was sent to lately hold its prefix: the least loaded of them. A key not
        # seen yet goes where the fewest keys are held, then the fewest calls are in flight, then to its
        # rendezvous owner. Unless that replica is max_imbalance over the least loaded of all, and over
        # BALANCE_RATIO times its load: then that one, which holds the key from now on (later requests
        # may use either).
        holders = [r for r in candidates if key in r.recent_keys]
        if holders:
            chosen = min(holders, key=lambda r: (r.in_flight, -rendezvous(key, r.name)))
        else:
            chosen = min(
                candidates, key=lambda r: (len(r.recent_keys), r.in_flight, -rendezvous(key, r.name))
            )
        if chosen.in_flight - least >= self.max_imbalance and chosen.in_flight > BALANCE_RATIO * least:
            chosen = idle[next(self._turn) % len(idle)]
        chosen.remember(key)
        return chosen

    @contextmanager
    def call(self, replica: Replica):
        """Count a call in flight on `replica` while the block runs."""
        replica.in_flight += 1
        replica.calls += 1
        try:
            yield replica
        finally:
            replica.in_flight -= 1


def _lookup(endpoint: Endpoint) -> list | None:
    try:
        return socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError:
        return None  # not resolvable yet (a replica still starting): the background refresh retries


def _expand(endpoint: Endpoint, infos: list | None) -> dict[str, str]:
    """name -> target for one endpoint: itself when literal, else the addresses of one family its name
    resolved to (`localhost` gives 127.0.0.1 and ::1: one server, not two)."""
    if endpoint.literal:
        return {endpoint.literal: endpoint.literal}
    if not endpoint.resolvable:
        host = endpoint.host
        return {_show(host, endpoint.port): _target(host, endpoint.port)}
    if not infos:
        return {}
    family = infos[0][0]
    hosts = dict.fromkeys(info[4][0] for info in infos if info[0] == family)
    return {_show(h, endpoint.port): _target(h, endpoint.port) for h in hosts}


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _verb(healthy: bool) -> str:
    return "is back in the pool" if healthy else "left the pool"


class PoolMetrics(Collector):
    """The gateway's view of its backends' replicas, read at each scrape: calls sent to each, calls in
    flight, and whether it is in the pool (label `backend`: the replica's address; `replica` is the
    gateway's own, on every sample)."""

    def __init__(self, pools: Iterable[ReplicaPool]):
        self.pools = list(pools)

    def collect(self) -> Iterator[Metric]:
        labels = ["service", "backend"]
        calls = CounterMetricFamily(
            "mmserve_gateway_backend_calls", "Calls sent to each backend replica", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "mmserve_gateway_backend_in_flight", "Calls in flight on each backend replica", labels=labels
        )
        up = GaugeMetricFamily(
            "mmserve_gateway_backend_up",
            "1 while a backend replica is in the pool (serving or not checked yet), else 0",
            labels=labels,
        )
        for pool in self.pools:
            serving = {id(r) for r in pool.serving()}
            for name, replica in pool.replicas.items():
                calls.add_metric([pool.service, name], replica.calls)
                in_flight.add_metric([pool.service, name], replica.in_flight)
                up.add_metric([pool.service, name], 1.0 if id(replica) in serving else 0.0)
        yield from (calls, in_flight, up)
