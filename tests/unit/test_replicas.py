"""gateway.replicas without servers: address parsing, membership, and the choice of a replica."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway import replicas
from gateway.replicas import Endpoint, ReplicaPool, _expand, parse_address
from mmserve.errors import UnavailableError


def pool(address: str, **kwargs) -> ReplicaPool:
    """A pool whose replicas all count as healthy, without background checks (no servers here)."""
    made = ReplicaPool("llm", address, 1 << 20, check_interval_s=0, **kwargs)
    for replica in made.replicas.values():
        replica.healthy, replica.status = True, "SERVING"
    return made


def in_loop(body):
    async def go():
        return body()

    return asyncio.run(go())  # grpc.aio channels belong to a running loop


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("llm:50052", [Endpoint("llm", 50052)]),
        ("dns:///llm:50052", [Endpoint("llm", 50052)]),
        ("10.0.0.1:1, 10.0.0.2:2", [Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 2)]),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", [Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 2)]),
        ("[::1]:5", [Endpoint("::1", 5)]),
        ("unix:/run/llm.sock", [Endpoint("", literal="unix:/run/llm.sock")]),
    ],
)
def test_addresses_name_one_replica_or_many(spec, expected):
    assert parse_address(spec) == expected


@pytest.mark.parametrize("spec", ["", "llm", "llm:port", "llm:0", "llm:70000", ":50052", ","])
def test_a_bad_address_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match="address"):
        parse_address(spec)


def test_a_name_resolving_to_several_addresses_is_several_replicas_of_one_family():
    v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 50052)) for ip in ("10.0.0.1", "10.0.0.2")]
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 50052, 0, 0))]
    assert _expand(Endpoint("llm", 50052), v4 + v6) == {
        "10.0.0.1:50052": "ipv4:10.0.0.1:50052",
        "10.0.0.2:50052": "ipv4:10.0.0.2:50052",
    }
    assert _expand(Endpoint("llm", 50052), v6) == {"[::1]:50052": "ipv6:[::1]:50052"}
    assert _expand(Endpoint("llm", 50052), None) == {}  # not resolvable yet: no replica, no error


def test_cache_aware_sends_a_key_to_one_replica_and_spreads_keys_over_all():
    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1")
        keys = [f"prompt-{i}".encode() for i in range(600)]
        owners = [p.choose(k).name for k in keys]
        assert owners == [p.choose(k).name for k in keys]  # the same key, the same replica
        assert {name: owners.count(name) for name in p.replicas} == dict.fromkeys(p.replicas, 200)

    in_loop(body)


def test_a_few_hot_keys_spread_over_the_replicas_whatever_their_hashes():
    """4 images over 2 replicas: 2 each (a hash alone puts all 4 on one replica 1 time in 8)."""

    def body():
        for run in range(16):
            p = pool(f"10.0.{run}.1:1,10.0.{run}.2:1")
            owners = [p.choose(b"image %d" % i).name for i in range(4)]
            assert sorted(owners.count(name) for name in p.replicas) == [2, 2], owners

    in_loop(body)


def test_a_new_key_goes_to_its_rendezvous_owner_on_every_gateway_while_loads_are_even():
    def body():
        gateways = [pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1") for _ in range(2)]
        for i in range(20):
            key = b"prompt %d" % i
            owner = max(gateways[0].replicas, key=lambda name: replicas.rendezvous(key, name))
            assert [g.choose(key).name for g in gateways] == [owner, owner]
            for g in gateways:  # forget, so that key counts stay even
                for replica in g.replicas.values():
                    replica.recent_keys.clear()

    in_loop(body)


def test_losing_a_replica_moves_only_the_keys_it_owned():
    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1")
        keys = [f"prompt-{i}".encode() for i in range(300)]
        before = [p.choose(k).name for k in keys]
        p.mark_failed(p.replicas["10.0.0.2:1"], "UNAVAILABLE: test")
        after = [p.choose(k).name for k in keys]
        moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
        assert moved and all(b == "10.0.0.2:1" for b, _ in moved)
        assert "10.0.0.2:1" not in after

    in_loop(body)


def test_an_overloaded_owner_is_passed_over_for_the_least_loaded():
    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1", max_imbalance=4)
        owner = p.choose(b"system prompt + image")
        other = next(r for r in p.replicas.values() if r is not owner)
        owner.in_flight = 3  # 3 more than the other: still under the imbalance allowed
        assert p.choose(b"system prompt + image") is owner
        owner.in_flight = 4
        assert p.choose(b"system prompt + image") is other
        assert p.choose(None) is other  # no key (no prompt yet): the least loaded

    in_loop(body)


def test_a_busy_pool_keeps_affinity_while_the_load_ratio_is_small():
    """20 vs 14 in flight is 6 over, but not 1.5 times as many: spilling would buy a cold prefill for
    little; 22 vs 14 is both."""

    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1", max_imbalance=4)
        owner = p.choose(b"image")
        other = next(r for r in p.replicas.values() if r is not owner)
        owner.in_flight, other.in_flight = 20, 14
        assert p.choose(b"image") is owner
        owner.in_flight = 22
        assert p.choose(b"image") is other

    in_loop(body)


def test_round_robin_and_least_loaded():
    def body():
        rr = pool("10.0.0.1:1,10.0.0.2:1", policy="round_robin")
        assert len({rr.choose(b"same").name for _ in range(4)}) == 2
        least = pool("10.0.0.1:1,10.0.0.2:1", policy="least_loaded")
        least.replicas["10.0.0.1:1"].in_flight = 1
        assert {least.choose(b"same").name for _ in range(4)} == {"10.0.0.2:1"}

    in_loop(body)


def test_no_replica_serving_is_a_clear_unavailable_error():
    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1")
        for replica in p.replicas.values():
            p.mark_failed(replica, "UNAVAILABLE: connection refused")
        with pytest.raises(
            UnavailableError, match="llm service is unavailable: no replica is serving"
        ) as info:
            p.choose(b"k")
        assert "10.0.0.1:1: UNAVAILABLE: connection refused" in str(info.value)
        p.replicas["10.0.0.2:1"].healthy = True  # a health check found it serving again
        assert p.choose(b"k").name == "10.0.0.2:1"

    in_loop(body)


def test_a_replica_whose_address_no_longer_resolves_is_retired_once_idle():
    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1")
        leaving = p.replicas["10.0.0.2:1"]
        leaving.in_flight = 1
        p._sync({"10.0.0.1:1": "ipv4:10.0.0.1:1"})  # a DNS answer without it (scaled down)
        assert leaving.retired and {p.choose(f"{i}".encode()).name for i in range(50)} == {"10.0.0.1:1"}
        assert p.states()["10.0.0.2:1"] == "RETIRED"
        p._sync({"10.0.0.1:1": "ipv4:10.0.0.1:1", "10.0.0.2:1": "ipv4:10.0.0.2:1"})  # back again
        assert not leaving.retired

    in_loop(body)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing policy 'random'"):
        ReplicaPool("llm", "10.0.0.1:1", 1 << 20, policy="random", check_interval_s=0)


def test_a_replica_that_took_a_key_over_holds_it_too():
    """After a spill the key has two holders: later requests go to the less loaded of them (both have
    its prefix cached), not back to the owner alone; a third replica never sees the key while either
    holder is within the imbalance allowed."""

    def body():
        p = pool("10.0.0.1:1,10.0.0.2:1,10.0.0.3:1", max_imbalance=2)
        key = b"system prompt + image"
        owner = p.choose(key)
        assert p.choose(key) is owner  # remembered and not loaded: the owner again
        owner.in_flight = 2
        spill = p.choose(key)  # 2 over the idle ones: the least loaded takes it
        assert spill is not owner and key in spill.recent_keys and key in owner.recent_keys
        third = next(r for r in p.replicas.values() if r not in (owner, spill))
        spill.in_flight = 1
        # holders: owner (2) and spill (1); the third is idle (0) but within 2 of the spill
        assert p.choose(key) is spill
        owner.in_flight = 0
        assert p.choose(key) is owner  # now the less loaded holder
        assert key not in third.recent_keys

    in_loop(body)


def test_recent_keys_are_bounded(monkeypatch):
    monkeypatch.setattr(replicas, "RECENT_KEYS", 3)

    def body():
        p = pool("10.0.0.1:1", max_imbalance=4)
        (only,) = p.replicas.values()
        for i in range(5):
            p.choose(b"key %d" % i)
        assert list(only.recent_keys) == [b"key 2", b"key 3", b"key 4"]
        p.choose(b"key 2")  # used again: now the most recent
        assert list(only.recent_keys) == [b"key 3", b"key 4", b"key 2"]

    in_loop(body)
