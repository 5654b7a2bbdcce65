"""Fetching image bytes from http(s), data: and file urls under the media security policy
(gateway.media_policy checks each http(s) hop's destination)."""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from gateway.config import MediaConfig
from gateway.media_policy import AddressPolicy, MediaError, short_url

MAX_URL_CHARS = 8192  # http(s) and file urls; data: urls are capped by the image byte cap instead


async def _refuse_non_http_redirect(response: httpx.Response) -> None:
    location = response.headers.get("location")
    if response.is_redirect and location:
        scheme = urlsplit(urljoin(str(response.request.url), location)).scheme.lower()
        if scheme not in ("http", "https"):  # file:, data:, gopher: ... never followed
            raise MediaError(
                f"image url redirected to a {scheme!r} url ({short_url(location)}); "
                "only http(s) redirects are followed"
            )


class MediaFetcher:
    def __init__(self, config: MediaConfig):
        self.config = config
        self.policy = AddressPolicy(config)
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
            raise MediaError(f"image url {short_url(url)} is malformed ({exc})") from None

    async def _fetch(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._from_data_url(url)
        if len(url) > MAX_URL_CHARS:
            raise MediaError(
                f"image url {short_url(url)} is {len(url)} characters, over the {MAX_URL_CHARS}-character limit"
            )
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._from_http(url), self.config.fetch_timeout_s)
            except TimeoutError:
                raise MediaError(
                    f"image url {short_url(url)} timed out after {self.config.fetch_timeout_s:g}s"
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

    async def _from_http(self, url: str) -> bytes:
        for _ in range(self.config.max_redirects + 1):
            address = await self.policy.checked_address(url)
            target, headers, extensions = _pinned(url, address)
            try:
                async with self._client.stream(
                    "GET", target, headers=headers, extensions=extensions
                ) as response:
                    if not response.is_redirect:
                        return await self._capped_body(url, response)
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError(f"image url {short_url(url)} redirected without a Location")
                    url = urljoin(url, location)
            except httpx.TimeoutException:
                raise MediaError(f"image url {short_url(url)} timed out") from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError
                raise MediaError(
                    f"image url {short_url(url)} could not be fetched ({type(exc).__name__}: {exc})"
                ) from None
        raise MediaError(f"image url {short_url(url)} redirected more than {self.config.max_redirects} times")

    async def _capped_body(self, url: str, response: httpx.Response) -> bytes:
        """A 200 response's body, read up to the image byte cap."""
        if response.status_code != 200:
            raise MediaError(f"image url {short_url(url)} answered HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        cap = self.config.max_image_bytes
        if declared and declared.isdigit() and int(declared) > cap:
            raise MediaError(f"image at {short_url(url)} is {declared} bytes, over the {cap} byte cap")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > cap:
                raise MediaError(f"image at {short_url(url)} is over the {cap} byte cap")
        return bytes(body)

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
                raise MediaError(f"file url {short_url(url)} names a host; use file:///absolute/path")
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


def _pinned(url: str, address: str | None) -> tuple[str, dict, dict]:
    """(target url, headers, httpx extensions) of a request to `url` that connects to the checked
    `address`: resolving the name again would let a DNS-rebinding host swap in a private address
    after the check. None: the url as it is (the HTTP client resolves the name)."""
    if address is None:
        return url, {}, {}
    parts = urlsplit(url)
    host = parts.hostname or ""
    ip = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port is not None else ""
    headers = {"Host": (f"[{host}]" if ":" in host else host) + port}
    # TLS SNI and certificate checks use the name, not the address connected to
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=ip + port)), headers, extensions
