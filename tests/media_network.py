"""The media tests' network: a fake DNS table in place of the resolver (no packet leaves the machine),
every socket connect to a non-loopback address a test failure, and the fetcher and per-hop policy
check driven from synchronous tests. Each test module's autouse `network` fixture yields from `offline_network`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from gateway.config import MediaConfig
from gateway.media import MediaFetcher
from gateway.media_policy import AddressPolicy
from tests.helpers import make_image

PNG = make_image(20, 10, seed=0)
PUBLIC_V4, PUBLIC_V6 = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"

# The fake DNS: name -> addresses. Names not here do not exist (NXDOMAIN).
FAKE_DNS = {
    "images.example": [PUBLIC_V4, PUBLIC_V6],
    "cdn.images.example": [PUBLIC_V4],
    "evilimages.example": [PUBLIC_V4],
    "images.example.evil": [PUBLIC_V4],
    "loopback.example": ["127.0.0.1"],
    "rebind.example": [PUBLIC_V4, "10.0.0.7"],  # one public and one private answer
    "metadata.example": ["169.254.169.254"],
    "v6loop.example": ["::1"],
    "xn--bcher-kva.example": ["127.0.0.1"],  # bücher.example
    "localhost": ["127.0.0.1", "::1"],
    "foo.localhost": [PUBLIC_V4],  # a resolver that does not special-case *.localhost
}
# Fixes the corpus found, not yet landed: their cases are expected to fail (strict xfail) until then.
PENDING_FIXES: set[str] = set()  # all landed; the tags stay as the record of what each case found


def found(fix: str):
    """Marks a case with the fix it found (an expected failure while that fix is pending)."""
    return pytest.mark.xfail(fix in PENDING_FIXES, reason=f"found a bug; fixed by {fix!r}", strict=True)


def case(*values, fix: str):
    return pytest.param(*values, marks=found(fix))


REAL_GETADDRINFO = socket.getaddrinfo
REAL_CONNECT = socket.socket.connect


class Network:
    def __init__(self):
        self.lookups: list[str] = []
        self.refused_connects: list[object] = []
        self.everything_public = False  # a resolver that answers every name, numeric spellings too


def offline_network(monkeypatch, request):
    """The body of each media test module's autouse `network` fixture: yields the Network record."""
    net = Network()

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if isinstance(host, bytes):
            host = host.decode("ascii")
        try:  # a numeric host never needs DNS (AI_NUMERICHOST: no lookup is sent)
            infos = REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            if not net.everything_public:
                return infos
        except socket.gaierror:
            pass
        net.lookups.append(host)
        name = host.lower().rstrip(".")
        answers = [PUBLIC_V4] if net.everything_public else FAKE_DNS.get(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
            for a in answers
        ]

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            if not ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback:
                net.refused_connects.append(address)
                raise AssertionError(f"a test tried to connect to {address}")
        return REAL_CONNECT(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield net
    marker = request.node.get_closest_marker("xfail")
    if marker is None or not marker.args or not marker.args[0]:
        assert not net.refused_connects, f"connections attempted to {net.refused_connects}"


def run(coro_fn, config):
    async def go():
        fetcher = MediaFetcher(config)
        try:
            return await coro_fn(fetcher)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def check(url, config=None):
    """The per-hop policy check alone: the address the fetcher would connect to."""
    return asyncio.run(AddressPolicy(config or MediaConfig()).checked_address(url))


def fetch(url, config=None):
    return run(lambda f: f.fetch(url), config or MediaConfig())
