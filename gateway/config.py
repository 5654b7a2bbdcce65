"""Configuration of the gateway process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
import ipaddress
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from gateway.replicas import POLICIES, parse_address
from mmserve.cli import EnvFlags
from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES
from mmserve.images import DEFAULT_MAX_IMAGE_PIXELS
from mmserve.internal_auth import resolve_token
from mmserve.service_config import internal_token_flags

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def parse_allowed_domain(entry: str) -> tuple[str, int | None]:
    """One allow-list entry -> (host, port or None).

    `host` or `host:port`; an IPv6 address goes in brackets (`[2001:db8::1]:8443`, a bare one has no
    port). The host comes back in lower-case ASCII (IDNA, no trailing dot; an IPv6 address compressed,
    without brackets); None for the port means only the url scheme's default port (80/443)."""
    text = entry.strip()
    try:
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError("an IPv6 address needs its closing ']'")
            port_text = rest[1:] if rest else None
            host = str(ipaddress.IPv6Address(host))
        elif text.count(":") > 1:
            host, port_text = str(ipaddress.IPv6Address(text)), None
        else:
            host, sep, port_text = text.partition(":")
            port_text = port_text if sep else None
            host = host.rstrip(".").lower().encode("idna").decode("ascii")
            if not _HOST_NAME.fullmatch(host):
                raise ValueError("not a host name or IP address")
        port = None
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"port {port_text!r} is not in 1-65535")
            port = int(port_text)
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"allowed domain {entry!r} is not host or host:port ({exc})") from None
    return host, port


def format_allowed_domain(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


@dataclass
class MediaConfig:
    """The media-fetching security policy (DESIGN.md, Security)."""

    fetch_timeout_s: float = 10.0  # per url, connect + read
    max_image_bytes: int = 20 * 1024 * 1024  # per image, enforced while streaming the body
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # read from the header, before any decode
    allow_private_urls: bool = False  # private, loopback and link-local destinations refused unless set
    # host or host:port entries (subdomains included); no port = the scheme's default; empty = any public host
    allowed_domains: list[str] = field(default_factory=list)
    allowed_local_media_path: str | None = None  # local files only under this folder; None = off
    max_redirects: int = 5

    def __post_init__(self):
        if self.fetch_timeout_s <= 0 or self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("fetch timeout, byte cap and pixel cap must be positive")
        self.allowed_domains = [format_allowed_domain(*parse_allowed_domain(d)) for d in self.allowed_domains]
        if self.allowed_local_media_path is not None:
            if not Path(self.allowed_local_media_path).is_dir():
                raise ValueError(
                    f"allowed local media path {self.allowed_local_media_path!r} is not a folder"
                )
            self.allowed_local_media_path = str(Path(self.allowed_local_media_path).resolve())


@dataclass
class GatewayConfig:
    checkpoint: str  # model folder: tokenizer, chat template and config.json come from here
    # One replica or many: a list (a:p,b:p) or a DNS name resolving to several (gateway.replicas)
    vision_addr: str = "127.0.0.1:50051"
    llm_addr: str = "127.0.0.1:50052"
    # Which LLM replica serves a request: cache_aware (same prompt beginning -> same replica, unless it has
    # llm_routing_max_imbalance more requests in flight than the least loaded, and 1.5 times as many),
    # least_loaded, round_robin
    llm_routing: str = "cache_aware"
    llm_routing_max_imbalance: int = 8
    tokenizer_path: str | None = None  # tokenizer folder when it differs from the checkpoint (TOKENIZER_PATH)
    model_type: str | None = None  # family override (MODEL_TYPE)
    model_name: str | None = None  # name reported by /v1/models; default: the checkpoint folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    max_images_per_request: int = 16
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    backend_timeout_s: float = 120.0  # deadline of each vision call (capped by request_timeout_s)
    max_request_bytes: int = 64 * 1024 * 1024  # HTTP request bodies over this get 413
    # Chat/completion requests in flight at once (streams until their end); one more gets 429 with
    # Retry-After at once, before its body is read. Above the LLM service's own queue (128 running +
    # 256 waiting by default), so that one LLM replica's RESOURCE_EXHAUSTED usually comes first.
    max_pending_requests: int = 512
    # A chat/completion request's total time: when it passes, the generation is cancelled in the LLM
    # service (its KV freed) and the client gets a 504 (a stream: an error event + [DONE]). 0 = no limit.
    request_timeout_s: float = 600.0
    # On SIGTERM: stop accepting, let in-flight requests finish for this long, then end what is left
    # with an error (an SSE error event + [DONE]), then exit. Long enough for a typical generation.
    drain_timeout_s: float = 30.0
    # Chat template override: a file (.jinja, or .json with a chat_template key) or the Jinja text itself;
    # None: the checkpoint's (tokenizer's, else chat_template.jinja, else chat_template.json).
    chat_template: str | None = None
    # The shared secret sent on every call to the services (mmserve.internal_auth), or a file holding
    # it; both unset = none sent. After __post_init__, `internal_token` holds the secret either way.
    internal_token: str | None = field(default=None, repr=False)
    internal_token_file: str | None = None
    media: MediaConfig = field(default_factory=MediaConfig)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.llm_routing not in POLICIES:
            raise ValueError(f"LLM routing {self.llm_routing!r} is not one of {', '.join(POLICIES)}")
        if self.llm_routing_max_imbalance < 1:
            raise ValueError(f"llm_routing_max_imbalance must be >= 1, got {self.llm_routing_max_imbalance}")
        for name, address in (("vision", self.vision_addr), ("llm", self.llm_addr)):
            try:
                parse_address(address)
            except ValueError as exc:
                raise ValueError(f"{name} address: {exc}") from None
        if self.max_images_per_request < 0:
            raise ValueError("max_images_per_request must be >= 0")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {self.max_pending_requests}")
        if not self.request_timeout_s >= 0:
            raise ValueError(f"request_timeout_s must be >= 0 (0 = no limit), got {self.request_timeout_s}")
        self.internal_token = resolve_token(self.internal_token, self.internal_token_file)
        self.tokenizer_path = self.tokenizer_path or self.checkpoint
        self.model_name = self.model_name or Path(self.checkpoint).resolve().name

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GatewayConfig:
        p = argparse.ArgumentParser(
            prog="python -m gateway", description="mmserve gateway (OpenAI-compatible HTTP)"
        )
        _gateway_flags(EnvFlags(p, cls))
        _media_flags(EnvFlags(p, MediaConfig))
        args = vars(p.parse_args(argv))
        if not args["checkpoint"]:
            p.error("--checkpoint (or CHECKPOINT_PATH) is required")
        domains = args.pop("allowed_domains") or []
        if isinstance(domains, str):
            domains = [d.strip().lower() for d in domains.split(",") if d.strip()]
        media_names = {f.name for f in fields(MediaConfig)}
        media_args = {k: args.pop(k) for k in list(args) if k in media_names}
        return cls(**args, media=MediaConfig(**media_args, allowed_domains=domains))


def _gateway_flags(flags: EnvFlags) -> None:
    """GatewayConfig's flags, each with the environment variable it also reads."""
    flags.add("checkpoint", "CHECKPOINT_PATH", help="model folder")
    flags.add("tokenizer_path", "TOKENIZER_PATH", help="tokenizer folder", flag="--tokenizer")
    flags.add("model_type", "MODEL_TYPE", help="family override")
    flags.add("model_name", "MODEL_NAME", help="name served in /v1/models")
    flags.add(
        "vision_addr",
        "VISION_ADDR",
        help="vision service address: host:port, a comma-separated list, or a name resolving to replicas",
        flag="--vision",
    )
    flags.add(
        "llm_addr",
        "LLM_ADDR",
        help="LLM service address: host:port, a comma-separated list, or a name resolving to replicas",
        flag="--llm",
    )
    flags.add(
        "llm_routing",
        "LLM_ROUTING",
        help="LLM replica choice: cache_aware (prompts sharing a beginning go to one replica), "
        "least_loaded, round_robin",
    )
    flags.add(
        "llm_routing_max_imbalance",
        "LLM_ROUTING_MAX_IMBALANCE",
        int,
        "cache_aware: requests in flight a replica may have over the least loaded one before it is passed over",
    )
    flags.add("host", "HOST", help="bind address")
    flags.add("port", "PORT", int, "HTTP port")
    flags.add("api_key", "API_KEY", help="require this bearer token")
    flags.add("max_images_per_request", "MAX_IMAGES_PER_REQUEST", int, "images per request")
    flags.add("max_message_bytes", "GRPC_MAX_MESSAGE_BYTES", int, "gRPC message size limit")
    flags.add(
        "backend_timeout_s", "BACKEND_TIMEOUT", float, "seconds per vision call", flag="--backend-timeout"
    )
    flags.add("max_request_bytes", "MAX_REQUEST_BYTES", int, "HTTP request body limit")
    flags.add(
        "max_pending_requests",
        "MAX_PENDING_REQUESTS",
        int,
        "chat/completion requests in flight; one more gets 429 + Retry-After",
    )
    flags.add(
        "request_timeout_s",
        "REQUEST_TIMEOUT",
        float,
        "seconds a chat/completion request may take in all (then 504), 0 = no limit",
        flag="--request-timeout",
    )
    flags.add(
        "drain_timeout_s",
        "DRAIN_TIMEOUT",
        float,
        "seconds in-flight requests get to finish after SIGTERM",
        flag="--drain-timeout",
    )
    flags.add(
        "chat_template",
        "CHAT_TEMPLATE",
        help="chat template overriding the checkpoint's: a file path or the Jinja text itself",
    )
    internal_token_flags(flags)


def _media_flags(media: EnvFlags) -> None:
    """MediaConfig's flags: the image-fetching policy."""
    media.add(
        "fetch_timeout_s", "MEDIA_FETCH_TIMEOUT", float, "seconds per image url", flag="--fetch-timeout"
    )
    media.add("max_image_bytes", "MAX_IMAGE_BYTES", int, "bytes per image")
    media.add("max_image_pixels", "MAX_IMAGE_PIXELS", int, "pixels per image, read from the header")
    media.switch("allow_private_urls", "ALLOW_PRIVATE_URLS", "allow loopback/private/link-local image urls")
    media.add(
        "allowed_domains",
        "ALLOWED_MEDIA_DOMAINS",
        help="comma-separated allow-list of image url hosts, each host[:port] (subdomains included, "
        "IPv6 in brackets); an entry without a port allows only the scheme's default port "
        "(80 for http, 443 for https); every redirect hop is checked against it",
    )
    media.add(
        "allowed_local_media_path", "ALLOWED_LOCAL_MEDIA_PATH", help="local images only under this folder"
    )
