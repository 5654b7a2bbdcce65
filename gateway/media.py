"""Fetching image bytes from http(s), data: and file urls under the media security policy."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from gateway.config import MediaConfig, parse_allowed_domain
from mmserve.errors import InvalidInputError


class MediaError(InvalidInputError):
    """An image source cannot be used (HTTP 400 naming the source)."""


MAX_URL_CHARS = 8192  # http(s) and file urls; data: urls are capped by the image byte cap instead


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _is_public(address: str) -> bool:
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


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
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


async def _refuse_non_http_redirect(response: httpx.Response) -> None:
    location = response.headers.get("location")
    if response.is_redirect and location:
        scheme = urlsplit(urljoin(str(response.request.url), location)).scheme.lower()
        if scheme not in ("http", "https"):  # file:, data:, gopher: ... never followed
            raise MediaError(
                f"image url redirected to a {scheme!r} url ({_short(location)}); "
                "only http(s) redirects are followed"
            )


class MediaFetcher:
    def __init__(self, config: MediaConfig):
        self.config = config
        self._allowed = [parse_allowed_domain(entry) for entry in config.allowed_domains]
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.fetch_timeout_s),
            follow_redirects=False,  # each hop is re-checked against the policy
            headers={"User-Agent": "mmserve-gateway"},
            trust_env=False,
            # Runs before httpx parses the Location itself (which raises InvalidURL on data: urls).
            event_hooks={"response": [_refuse_non_http_redirect]},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise MediaError("image url is empty")
        try:
            return await self._fetch(url)
        except (ValueError, UnicodeError) as exc:  # urlsplit, ports, IDNA, NUL bytes in paths
            raise MediaError(f"image url {_short(url)} is malformed ({exc})") from None

    async def _fetch(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._from_data_url(url)
        if len(url) > MAX_URL_CHARS:
            raise MediaError(
                f"image url {_short(url)} is {len(url)} characters, over the {MAX_URL_CHARS}-character limit"
            )
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._from_http(url), self.config.fetch_timeout_s)
            except TimeoutError:
                raise MediaError(
                    f"image url {_short(url)} timed out after {self.config.fetch_timeout_s:g}s"
                ) from None
        if scheme == "file" or (scheme == "" and url.startswith("/") and not url.startswith("//")):
            return await asyncio.to_thread(self._from_file, url)
        raise MediaError(
            f"image url scheme {scheme or '(none)'!r} is not supported; use http(s), data: or file://"
        )

    # ---- data: -------------------------------------------------------------------------------

    def _from_data_url(self, url: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise MediaError("data url has no ',' separating header and data")
        media_type = header.split(";")[0].strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise MediaError(f"data url media type {media_type!r} is not an image")
        if header.split(";")[-1].strip().lower() != "base64":  # ';base64' ends the header (RFC 2397)
            raise MediaError("data url must be base64-encoded (data:image/...;base64,...)")
        if len(payload) > self.config.max_image_bytes * 4 // 3 + 4:
            raise MediaError(f"data url image is over the {self.config.max_image_bytes} byte cap")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("data url payload is not valid base64") from None

    # ---- http(s) -----------------------------------------------------------------------------

    async def _checked_address(self, url: str) -> str | None:
        """Check the destination against the policy; the address to connect to, or None to let the
        HTTP client resolve the name itself (private destinations allowed)."""
        parts = urlsplit(url)
        if "@" in parts.netloc:  # user@host: the classic way to make a url look like another host's
            raise MediaError(
                f"image url {_short(url)} carries a user name or password (user@host); "
                "credentials in image urls are refused"
            )
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise MediaError(f"image url {_short(url)} has no host")
        default_port = 443 if parts.scheme.lower() == "https" else 80
        port = parts.port if parts.port is not None else default_port
        if ":" not in host:  # a name or an IPv4 address: to the ASCII form the resolver would look up
            try:
                host = host.encode("idna").decode("ascii").rstrip(".")  # ⓛⓞⓒⓐⓛⓗⓞⓢⓣ -> localhost
            except UnicodeError as exc:
                raise MediaError(f"image host {_short(host)!r} is not a valid host name ({exc})") from None
            if not _HOST_NAME.fullmatch(host):  # percent-encoding, '\\', '!': refused before any lookup
                raise MediaError(
                    f"image host {_short(host)!r} is not a valid host name "
                    "(letters, digits, '-', '_' and '.' only; IDN names are accepted)"
                )
        literal = _ip_literal(host)
        if literal is not None:
            host = str(literal).split("%", 1)[0]  # canonical: the allow-list holds addresses so
        if self._allowed:
            self._check_allowed(host, port, default_port)
        if literal is not None:  # no resolver involved: the address is the one connected to
            if not self.config.allow_private_urls and not _is_public(str(literal)):
                raise MediaError(
                    f"image url {_short(url)} resolves to non-public address {literal}; "
                    "private, loopback and link-local destinations are refused (--allow-private-urls)"
                )
            return str(literal) if literal.version == 4 or "%" not in str(literal) else None
        if not self.config.allow_private_urls and (host == "localhost" or host.endswith(".localhost")):
            raise MediaError(
                f"image host {host!r} is a loopback name (RFC 6761: localhost and *.localhost), "
                "a non-public address; "
                "private, loopback and link-local destinations are refused (--allow-private-urls)"
            )
        if self.config.allow_private_urls:
            return None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise MediaError(f"image host {host!r} cannot be resolved ({exc.strerror or exc})") from None
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if not _is_public(address):
                raise MediaError(
                    f"image url {_short(url)} resolves to non-public address {address}; "
                    "private, loopback and link-local destinations are refused (--allow-private-urls)"
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

    async def _from_http(self, url: str) -> bytes:
        for _ in range(self.config.max_redirects + 1):
            address = await self._checked_address(url)
            target, headers, extensions = url, {}, {}
            if address is not None:
                # Connect to the address that was checked: resolving the name again would let a
                # DNS-rebinding host swap in a private address after the check.
                parts = urlsplit(url)
                host = parts.hostname or ""
                ip = f"[{address}]" if ":" in address else address
                port = f":{parts.port}" if parts.port is not None else ""
                target = urlunsplit(parts._replace(netloc=ip + port))
                headers["Host"] = (f"[{host}]" if ":" in host else host) + port
                if parts.scheme == "https":
                    extensions["sni_hostname"] = host  # TLS SNI and certificate checks use the name
            try:
                async with self._client.stream(
                    "GET", target, headers=headers, extensions=extensions
                ) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise MediaError(f"image url {_short(url)} redirected without a Location")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"image url {_short(url)} answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    cap = self.config.max_image_bytes
                    if declared and declared.isdigit() and int(declared) > cap:
                        raise MediaError(
                            f"image at {_short(url)} is {declared} bytes, over the {cap} byte cap"
                        )
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > cap:
                            raise MediaError(f"image at {_short(url)} is over the {cap} byte cap")
                    return bytes(body)
            except httpx.TimeoutException:
                raise MediaError(f"image url {_short(url)} timed out") from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError
                raise MediaError(
                    f"image url {_short(url)} could not be fetched ({type(exc).__name__}: {exc})"
                ) from None
        raise MediaError(f"image url {_short(url)} redirected more than {self.config.max_redirects} times")

    # ---- file ------------------------------------------------------------------------------------

    def _from_file(self, url: str) -> bytes:
        root = self.config.allowed_local_media_path
        if root is None:
            raise MediaError(
                "local image files are disabled (start the gateway with --allowed-local-media-path)"
            )
        if url.startswith("file:"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise MediaError(f"file url {_short(url)} names a host; use file:///absolute/path")
            raw = unquote(parts.path)
        else:
            raw = url
        if not raw.startswith("/"):
            raise MediaError(f"local image {raw!r} is not an absolute path")
        path = Path(raw).resolve()  # resolves symlinks and '..' before the containment check
        if not path.is_relative_to(root):
            raise MediaError(f"local image {raw!r} is outside the allowed folder")
        if not path.is_file():
            raise MediaError(f"local image {raw!r} does not exist")
        with open(path, "rb") as f:
            data = f.read(self.config.max_image_bytes + 1)  # never more than the cap, whatever the size says
        if len(data) > self.config.max_image_bytes:
            raise MediaError(f"local image {raw!r} is over the {self.config.max_image_bytes} byte cap")
        return data
