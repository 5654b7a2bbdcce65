"""Images -> embeddings: embedding cache, coalescing of identical misses, preprocessing pool, batcher."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from mmserve.checkpoint import parse_dtype, resolve_dtype
from mmserve.errors import DeadlineError, InvalidInputError, NotFoundError
from mmserve.families import adapter, detect_family
from mmserve.images import content_hash
from mmserve.wire import ImageFeatures, ImageInput, PixelLimits
from vision_service.batcher import EncodeBatcher, EncodeJob
from vision_service.cache import EmbeddingCache
from vision_service.config import VisionConfig
from vision_service.metrics import VisionMetrics
from vision_service.preprocess import Preprocessor

log = logging.getLogger(__name__)


def model_fingerprint(checkpoint: str, family: str, dtype: str) -> str:
    """Identifies what an embedding depends on besides the image: weights' config, preprocessing, dtype."""
    digest = hashlib.sha256(f"{family}|{dtype}".encode())
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        path = Path(checkpoint) / name
        if path.is_file():
            digest.update(json.dumps(json.loads(path.read_text()), sort_keys=True).encode())
    return digest.hexdigest()[:16]


class VisionEncoder:
    def __init__(self, config: VisionConfig):
        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.family = detect_family(config.checkpoint, config.model_type)
        dtype_name = resolve_dtype(config.dtype, config.checkpoint, config.device, "vision")
        self.dtype = parse_dtype(dtype_name)
        self.adapter = adapter(self.family, "vision")
        self.model = self.adapter.from_checkpoint(config.checkpoint, self.dtype, config.device)
        self.hidden_size = self.model.config.text_config.hidden_size
        self.model_key = model_fingerprint(config.checkpoint, self.family, dtype_name)
        self.metrics = VisionMetrics()
        self.cache = EmbeddingCache(config.cache_bytes, self.metrics)
        self.preprocess = Preprocessor(
            self.adapter,
            config.checkpoint,
            config.preprocess_mode,
            config.preprocess_workers,
            config.max_image_pixels,
        )
        if (config.min_pixels or config.max_pixels) and not getattr(
            self.adapter, "dynamic_resolution", False
        ):
            raise ValueError(f"min_pixels/max_pixels apply to dynamic-resolution families, not {self.family}")
        if config.compile:
            self._compile()
        self._batcher: EncodeBatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[str, EncodeJob] = {}
        log.info("vision model %s loaded from %s (dtype %s)", self.family, config.checkpoint, dtype_name)

    def _compile(self) -> None:
        """torch.compile the tower, and compile now (batch sizes 1 and 2, dynamic) rather than on a request."""
        from PIL import Image

        self.model.vision_tower = torch.compile(self.model.vision_tower, dynamic=True)
        item = self.adapter.preprocess_one(
            self.adapter.load_processor(self.config.checkpoint), Image.new("RGB", (64, 64))
        )
        inputs = {name: torch.from_numpy(array) for name, array in item.items()}
        started = time.monotonic()
        self.run_batch([inputs])
        self.run_batch([inputs, inputs])
        log.info("vision tower compiled in %.1fs", time.monotonic() - started)

    # ---- encoder thread ---------------------------------------------------------------------------

    def run_batch(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Model inputs of several images -> one (N_i, hidden) CPU tensor per image (one forward)."""
        return [emb.to("cpu").contiguous() for emb in self.model(**self.adapter.collate(items))]

    # ---- event loop -----------------------------------------------------------------------------------

    def _ensure_batcher(self) -> EncodeBatcher:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._loop is not loop:  # first call, or a new event loop (tests)
            if self._batcher is not None:
                self._batcher.close()
            self._batcher = EncodeBatcher(
                self.run_batch,
                self.config.max_batch_size,
                self.config.max_wait_ms / 1000,
                self.metrics,
                max_batch_cost=self.config.max_batch_patches,
            )
            self._loop, self._inflight = loop, {}
        return self._batcher

    async def _prepare(self, job: EncodeJob, data: bytes, batcher: EncodeBatcher, options: dict) -> None:
        started = time.monotonic()
        try:
            job.inputs = await self.preprocess(data, options)
        except Exception as exc:  # noqa: BLE001 - delivered to every waiter of this image
            self.metrics.images.labels("invalid").inc()
            if not job.future.done():
                job.future.set_exception(exc)
            return
        self.metrics.preprocess.observe(time.monotonic() - started)
        cost = getattr(self.adapter, "cost", None)
        job.cost = cost(job.inputs) if cost is not None else 0
        batcher.submit(job)

    def _finished(self, job: EncodeJob, future: asyncio.Future) -> None:
        if self._inflight.get(job.key) is job:
            del self._inflight[job.key]
        if not future.cancelled() and future.exception() is None:
            self.cache.put(job.key, ImageFeatures(future.result(), job.key.split(":", 1)[1], self._grid(job)))

    def _pixel_ceiling(self) -> int:
        """The largest resized image area this server allows: its --max-pixels, else the checkpoint's."""
        if self.config.max_pixels:
            return self.config.max_pixels
        if not hasattr(self, "_checkpoint_max_pixels"):
            size = getattr(self.adapter.load_processor(self.config.checkpoint), "size", None) or {}
            self._checkpoint_max_pixels = int(size.get("longest_edge") or 0)
        return self._checkpoint_max_pixels

    def _pixel_options(self, pixels: PixelLimits | None) -> dict[str, int]:
        """The resize bounds of a request (its own, else the service's), as preprocess_one keywords."""
        if not getattr(self.adapter, "dynamic_resolution", False):
            if pixels:
                raise InvalidInputError(
                    f"min_pixels/max_pixels are not supported by the {self.family} family (fixed resolution)"
                )
            return {}
        pixels = pixels or PixelLimits()
        options = {}
        ceiling = self._pixel_ceiling()
        for name, default in (("min_pixels", self.config.min_pixels), ("max_pixels", self.config.max_pixels)):
            value = getattr(pixels, name)
            if value is not None and value < 1:
                raise InvalidInputError(f"{name} must be a positive number of pixels, got {value}")
            if value is not None and ceiling and value > ceiling:
                # A request may narrow the server's bounds, never widen them: the resized area decides
                # the encoder's memory and time.
                raise InvalidInputError(f"{name} ({value}) is above this server's max_pixels ({ceiling})")
            if value is not None or default:
                options[name] = int(value if value is not None else default)
        if options.get("min_pixels", 0) > options.get("max_pixels", 1 << 62):
            raise InvalidInputError(
                f"min_pixels ({options['min_pixels']}) is larger than max_pixels ({options['max_pixels']})"
            )
        return options

    async def embed_async(
        self, images: list[ImageInput], deadline: float | None = None, pixels: PixelLimits | None = None
    ) -> list[ImageFeatures]:
        """Embeddings of `images` in order. `deadline` is a time.monotonic() instant.

        An image given by hash only (empty data) is answered from the cache, or raises NotFoundError
        so that the caller resends its bytes. `pixels` bounds the resized area of every image
        (dynamic-resolution families only); the embedding cache keys include the bounds.
        """
        if not images:
            raise InvalidInputError("no images given")
        if len(images) > self.config.max_images_per_request:
            raise InvalidInputError(
                f"{len(images)} images in one request, over the limit of {self.config.max_images_per_request}"
            )
        hashes = []
        for i, image in enumerate(images):
            if not image.data and not image.content_hash:
                raise InvalidInputError(f"image {i} has neither bytes nor a content hash")
            digest = content_hash(image.data) if image.data else image.content_hash
            if image.data and image.content_hash and image.content_hash != digest:
                raise InvalidInputError(f"image {i}: content_hash does not match the SHA-256 of its bytes")
            hashes.append(digest)

        options = self._pixel_options(pixels)
        batcher = self._ensure_batcher()
        loop = asyncio.get_running_loop()
        # The same image resized to other bounds is another embedding (another N_i). No ':' in the suffix:
        # the part after the first ':' is the content hash.
        variant = "".join(f"|{name}={value}" for name, value in sorted(options.items()))
        keys = [f"{self.model_key}{variant}:{digest}" for digest in hashes]
        missing = [
            i
            for i, (image, key) in enumerate(zip(images, keys, strict=True))
            if not image.data and key not in self._inflight and key not in self.cache
        ]
        if missing:  # checked before any work starts: the caller will resend the request with bytes
            raise NotFoundError(f"images {missing} are not in the embedding cache; send their bytes")

        results: list[ImageFeatures | None] = [None] * len(images)
        waiting: list[tuple[int, EncodeJob]] = []
        for i, (image, key) in enumerate(zip(images, keys, strict=True)):
            cached = self.cache.get(key)
            if cached is not None:
                self.metrics.images.labels("cached").inc()
                results[i] = cached
                continue
            job = self._inflight.get(key)
            if job is not None:  # the same image is already being encoded: wait for that one
                self.metrics.images.labels("coalesced").inc()
                job.waiters += 1
                job.extend_deadline(deadline)
            else:
                job = EncodeJob(key, loop.create_future(), deadline=deadline)
                self._inflight[key] = job
                job.future.add_done_callback(functools.partial(self._finished, job))
                loop.create_task(self._prepare(job, image.data, batcher, options))
            waiting.append((i, job))

        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(timeout):
                for i, job in waiting:
                    try:
                        embedding = await asyncio.shield(job.future)
                    except InvalidInputError as exc:
                        raise InvalidInputError(f"image {i}: {exc}") from None
                    results[i] = ImageFeatures(embedding, hashes[i], self._grid(job))
        except TimeoutError:
            raise DeadlineError("the request deadline passed before its images were encoded") from None
        finally:
            for _, job in waiting:
                job.waiters -= 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _grid(self, job: EncodeJob) -> tuple[int, ...]:
        return self.adapter.grid_thw(job.inputs) if job.inputs is not None else ()

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self.preprocess.close()
