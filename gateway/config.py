"""Configuration of the gateway process (CLI flags and environment variables map onto it)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES
from mmserve.images import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class MediaConfig:
    """The media-fetching security policy (DESIGN.md, Security)."""

    fetch_timeout_s: float = 10.0  # per url, connect + read
    max_image_bytes: int = 20 * 1024 * 1024  # per image, enforced while streaming the body
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # read from the header, before any decode
    allow_private_urls: bool = False  # private, loopback and link-local destinations refused unless set
    allowed_domains: list[str] = field(default_factory=list)  # empty = any public host
    allowed_local_media_path: str | None = None  # local files only under this folder; None = off
    max_redirects: int = 5

    def __post_init__(self):
        if self.fetch_timeout_s <= 0 or self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("fetch timeout, byte cap and pixel cap must be positive")
        if self.allowed_local_media_path is not None:
            if not Path(self.allowed_local_media_path).is_dir():
                raise ValueError(
                    f"allowed local media path {self.allowed_local_media_path!r} is not a folder"
                )
            self.allowed_local_media_path = str(Path(self.allowed_local_media_path).resolve())


@dataclass
class GatewayConfig:
    checkpoint: str  # model folder: tokenizer, chat template and config.json come from here
    vision_addr: str = "127.0.0.1:50051"
    llm_addr: str = "127.0.0.1:50052"
    tokenizer_path: str | None = None  # tokenizer folder when it differs from the checkpoint (TOKENIZER_PATH)
    model_type: str | None = None  # family override (MODEL_TYPE)
    model_name: str | None = None  # name reported by /v1/models; default: the checkpoint folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    max_images_per_request: int = 16
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    backend_timeout_s: float = 120.0  # deadline of each vision call (generation streams have none)
    max_request_bytes: int = 64 * 1024 * 1024  # HTTP request bodies over this get 413
    media: MediaConfig = field(default_factory=MediaConfig)

    def __post_init__(self):
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_images_per_request < 0:
            raise ValueError("max_images_per_request must be >= 0")
        self.tokenizer_path = self.tokenizer_path or self.checkpoint
        self.model_name = self.model_name or Path(self.checkpoint).resolve().name

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GatewayConfig:
        env = os.environ.get
        p = argparse.ArgumentParser(
            prog="python -m gateway", description="mmserve gateway (OpenAI-compatible HTTP)"
        )
        p.add_argument("--checkpoint", default=env("CHECKPOINT_PATH"), help="model folder [CHECKPOINT_PATH]")
        p.add_argument(
            "--tokenizer",
            dest="tokenizer_path",
            default=env("TOKENIZER_PATH"),
            help="tokenizer folder [TOKENIZER_PATH]",
        )
        p.add_argument("--model-type", default=env("MODEL_TYPE"), help="family override [MODEL_TYPE]")
        p.add_argument(
            "--model-name", default=env("MODEL_NAME"), help="name served in /v1/models [MODEL_NAME]"
        )
        p.add_argument(
            "--vision",
            dest="vision_addr",
            default=env("VISION_ADDR", "127.0.0.1:50051"),
            help="vision service address [VISION_ADDR]",
        )
        p.add_argument(
            "--llm",
            dest="llm_addr",
            default=env("LLM_ADDR", "127.0.0.1:50052"),
            help="LLM service address [LLM_ADDR]",
        )
        p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="bind address [HOST]")
        p.add_argument("--port", type=int, default=int(env("PORT", "8000")), help="HTTP port [PORT]")
        p.add_argument("--api-key", default=env("API_KEY"), help="require this bearer token [API_KEY]")
        p.add_argument(
            "--max-images-per-request",
            type=int,
            default=int(env("MAX_IMAGES_PER_REQUEST", "16")),
            help="[MAX_IMAGES_PER_REQUEST]",
        )
        p.add_argument(
            "--max-message-bytes",
            type=int,
            default=int(env("GRPC_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)),
            help="gRPC message size limit [GRPC_MAX_MESSAGE_BYTES]",
        )
        p.add_argument(
            "--fetch-timeout",
            type=float,
            default=float(env("MEDIA_FETCH_TIMEOUT", "10")),
            help="seconds per image url [MEDIA_FETCH_TIMEOUT]",
        )
        p.add_argument(
            "--max-image-bytes",
            type=int,
            default=int(env("MAX_IMAGE_BYTES", 20 * 1024 * 1024)),
            help="[MAX_IMAGE_BYTES]",
        )
        p.add_argument(
            "--max-image-pixels",
            type=int,
            default=int(env("MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)),
            help="[MAX_IMAGE_PIXELS]",
        )
        p.add_argument(
            "--allow-private-urls",
            action="store_true",
            default=env("ALLOW_PRIVATE_URLS", "") == "1",
            help="allow loopback/private/link-local image urls [ALLOW_PRIVATE_URLS=1]",
        )
        p.add_argument(
            "--allowed-domains",
            default=env("ALLOWED_MEDIA_DOMAINS", ""),
            help="comma-separated host allow-list for image urls [ALLOWED_MEDIA_DOMAINS]",
        )
        p.add_argument(
            "--allowed-local-media-path",
            default=env("ALLOWED_LOCAL_MEDIA_PATH"),
            help="serve file:// images from under this folder only [ALLOWED_LOCAL_MEDIA_PATH]",
        )
        p.add_argument(
            "--backend-timeout",
            type=float,
            default=float(env("BACKEND_TIMEOUT", "120")),
            help="seconds allowed for each vision service call [BACKEND_TIMEOUT]",
        )
        p.add_argument(
            "--max-request-bytes",
            type=int,
            default=int(env("MAX_REQUEST_BYTES", 64 * 1024 * 1024)),
            help="HTTP request body limit [MAX_REQUEST_BYTES]",
        )
        args = p.parse_args(argv)
        if not args.checkpoint:
            p.error("--checkpoint (or CHECKPOINT_PATH) is required")
        media = MediaConfig(
            fetch_timeout_s=args.fetch_timeout,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            allow_private_urls=args.allow_private_urls,
            allowed_domains=[d.strip().lower() for d in args.allowed_domains.split(",") if d.strip()],
            allowed_local_media_path=args.allowed_local_media_path,
        )
        return cls(
            checkpoint=args.checkpoint,
            tokenizer_path=args.tokenizer_path,
            model_type=args.model_type,
            model_name=args.model_name,
            vision_addr=args.vision_addr,
            llm_addr=args.llm_addr,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_images_per_request=args.max_images_per_request,
            max_message_bytes=args.max_message_bytes,
            backend_timeout_s=args.backend_timeout,
            max_request_bytes=args.max_request_bytes,
            media=media,
        )
