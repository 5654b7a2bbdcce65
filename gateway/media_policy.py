"""The media security policy for http(s) image urls: which destinations a fetch may connect to."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from urllib.parse import unquote, urlsplit

from gateway.config import MediaConfig, parse_allowed_domain
from mmserve.errors import InvalidInputError


class MediaError(InvalidInputError):
    """An image source cannot be used (HTTP 400 naming the source)."""


def short_url(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_PRIVATE_REFUSED = "private, loopback and link-local destinations are refused (--allow-private-urls)"


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:  # DNS64/NAT64 (RFC 6052): the IPv4 address it reaches decides
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour or ip.teredo or ip.is_site_local:  # tunnels can reach IPv4 private space
            return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    )


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_IPV4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP-literal host names, in any spelling a resolver accepts (inet_aton: 1-4 parts,
    each decimal, octal or hex: 127.1, 0x7f000001, 2130706433, 0177.0.0.1), else None for a name.
    Parsed here so that the policy never depends on how the platform's resolver reads numbers; a host
    whose last label is a number but that is no IPv4 address (256.0.0.1, 1.2.3.4.5) is refused."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(unquote(host))  # a zone id comes percent-encoded: fe80::1%25eth0
        except ValueError:
            raise MediaError(f"image host {host!r} is not a valid IPv6 address") from None
    parts = host.split(".")
    if not _NUMERIC_LABEL.fullmatch(parts[-1]):
        return None
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        raise MediaError(f"image host {host!r} is not a valid IPv4 address")
    values = [
        int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8) if p.startswith("0") else int(p)
        for p in parts
    ]
    if any(v > 255 for v in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        raise MediaError(f"image host {host!r} is not a valid IPv4 address")
    number = 0
    for v in values[:-1]:
        number = number * 256 + v
    return ipaddress.IPv4Address((number << 8 * (5 - len(values))) + values[-1])


def _ascii_host(host: str) -> str:
    """A name or an IPv4 address, in the ASCII form the resolver would look up."""
    try:
        host = host.encode("idna").decode("ascii").rstrip(".")  # ⓛⓞⓒⓐⓛⓗⓞⓢⓣ -> localhost
    except UnicodeError as exc:
        raise MediaError(f"image host {short_url(host)!r} is not a valid host name ({exc})") from None
    if not _HOST_NAME.fullmatch(host):  # percent-encoding, '\\', '!': refused before any lookup
        raise MediaError(
            f"image host {short_url(host)!r} is not a valid host name "
            "(letters, digits, '-', '_' and '.' only; IDN names are accepted)"
        )
    return host


class AddressPolicy:
    """Checks each hop of an http(s) fetch, before it connects: no credentials in the url, a valid
    host, the allow-list (when there is one), and (unless private urls are allowed) public addresses
    only, every address the name resolves to."""

    def __init__(self, config: MediaConfig):
        self.config = config
        self._allowed = [parse_allowed_domain(entry) for entry in config.allowed_domains]

    async def checked_address(self, url: str) -> str | None:
        """The address to connect to, or None to let the HTTP client resolve the name itself (private
        destinations allowed); MediaError naming the url when the policy refuses it."""
        parts = urlsplit(url)
        if "@" in parts.netloc:  # user@host: the classic way to make a url look like another host's
            raise MediaError(
                f"image url {short_url(url)} carries a user name or password (user@host); "
                "credentials in image urls are refused"
            )
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise MediaError(f"image url {short_url(url)} has no host")
        default_port = 443 if parts.scheme.lower() == "https" else 80
        port = parts.port if parts.port is not None else default_port
        if ":" not in host:
            host = _ascii_host(host)
        literal = ip_literal(host)
        if literal is not None:
            host = str(literal).split("%", 1)[0]  # canonical: the allow-list holds addresses so
        if self._allowed:
            self._check_allowed(host, port, default_port)
        if literal is not None:
            return self._literal_address(url, literal)
        return await self._resolved_address(url, host, port)

    def _literal_address(
        self, url: str, literal: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> str | None:
        """No resolver involved: the address is the one connected to."""
        if not self.config.allow_private_urls and not is_public(str(literal)):
            raise MediaError(
                f"image url {short_url(url)} resolves to non-public address {literal}; {_PRIVATE_REFUSED}"
            )
        return str(literal) if literal.version == 4 or "%" not in str(literal) else None

    async def _resolved_address(self, url: str, host: str, port: int) -> str | None:
        """A name: refused when it is a loopback name or any address it resolves to is not public."""
        if not self.config.allow_private_urls and (host == "localhost" or host.endswith(".localhost")):
            raise MediaError(
                f"image host {host!r} is a loopback name (RFC 6761: localhost and *.localhost), "
                f"a non-public address; {_PRIVATE_REFUSED}"
            )
        if self.config.allow_private_urls:
            return None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise MediaError(f"image host {host!r} cannot be resolved ({exc.strerror or exc})") from None
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if not is_public(address):
                raise MediaError(
                    f"image url {short_url(url)} resolves to non-public address {address}; {_PRIVATE_REFUSED}"
                )
        return addresses[0]

    def _check_allowed(self, host: str, port: int, default_port: int) -> None:
        """The allow-list: the host (or a subdomain of an entry's name) and the port must match one
        entry; an entry without a port allows only the scheme's default port."""
        try:
            host = str(ipaddress.IPv6Address(host))  # entries hold IPv6 addresses compressed
        except ValueError:
            pass
        hosts = [
            (h, p)
            for h, p in self._allowed
            if host == h or (host.endswith("." + h) and not h.replace(".", "").isdigit() and ":" not in h)
        ]
        if not hosts:
            raise MediaError(f"image host {host!r} is not in the allowed domains")
        if not any(port == (p if p is not None else default_port) for _, p in hosts):
            raise MediaError(
                f"image url port {port} of {host!r} is not in the allowed domains "
                f"({', '.join(self.config.allowed_domains)}; an entry without a port allows only "
                f"the scheme's default port, {default_port})"
            )
