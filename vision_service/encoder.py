"""Images -> embeddings: embedding cache, coalescing of identical misses, preprocessing pool, batcher."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import cast

import torch

from mmserve.checkpoint import parse_dtype, resolve_dtype
from mmserve.errors import DeadlineError, InvalidInputError, NotFoundError, OverloadedError, UnavailableError
from mmserve.families import adapter, detect_family
from mmserve.half_cpu import upcast_half_matmuls
from mmserve.images import content_hash
from mmserve.step_health import StepHealth
from mmserve.wire import ImageFeatures, ImageInput, PixelLimits
from vision_service.batcher import EncodeBatcher, EncodeJob, unhealthy_message
from vision_service.cache import EmbeddingCache, EmbeddingKey
from vision_service.config import VisionConfig
from vision_service.metrics import VisionMetrics
from vision_service.preprocess import Preprocessor
from vision_service.resize import ResizePolicy, resize_options

log = logging.getLogger(__name__)


def verified_hash(index: int, image: ImageInput) -> str:
    """The image's hex SHA-256: of its bytes when it has them (a hash sent along must match), else the
    hash it was sent by."""
    if not image.data and not image.content_hash:
        raise InvalidInputError(f"image {index} has neither bytes nor a content hash")
    if not image.data:
        return image.content_hash
    digest = content_hash(image.data)
    if image.content_hash and image.content_hash != digest:
        raise InvalidInputError(f"image {index}: content_hash does not match the SHA-256 of its bytes")
    return digest


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
        upcast_half_matmuls(cast(torch.nn.Module, self.model), self.dtype, config.device, "vision")
        self.hidden_size = self.model.hidden_size
        self.model_key = model_fingerprint(config.checkpoint, self.family, dtype_name)
        self.metrics = VisionMetrics()
        self.cache = EmbeddingCache(config.cache_bytes, self.metrics)
        self.resize = ResizePolicy(self.adapter, self.family, config)  # checks the config's bounds
        self.preprocess = Preprocessor(
            self.adapter,
            config.checkpoint,
            config.preprocess_mode,
            config.preprocess_workers,
            config.max_image_pixels,
        )
        if config.compile:
            self._compile()
        self._batcher: EncodeBatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[EmbeddingKey, EncodeJob] = {}  # keys being encoded now
        self.health = StepHealth()  # of the forwards; is_alive() (gRPC health) reads it
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
                health=self.health,
            )
            self._loop, self._inflight = loop, {}
        return self._batcher

    # ---- embed_async's steps ------------------------------------------------------------------------

    async def embed_async(
        self, images: list[ImageInput], deadline: float | None = None, pixels: PixelLimits | None = None
    ) -> list[ImageFeatures]:
        """Embeddings of `images` in order. `deadline` is a time.monotonic() instant.

        An image given by hash only (empty data) is answered from the cache, or raises NotFoundError
        so that the caller resends its bytes. `pixels` bounds the resized area of every image
        (dynamic-resolution families only); the embedding cache keys include the bounds.
        """
        if not self.health.ok:
            raise UnavailableError(unhealthy_message(self.health))
        keys = self._keys(images, pixels)
        batcher = self._ensure_batcher()  # before the hash-only check: a new event loop has no jobs
        self._check_hash_only_known(images, keys)
        results = [self._cached(key) for key in keys]
        self._check_room([key for key, cached in zip(keys, results, strict=True) if cached is None])
        waiting = [
            (i, self._job_for(key, image.data, deadline, batcher))
            for i, (image, key) in enumerate(zip(images, keys, strict=True))
            if results[i] is None
        ]
        await self._collect(waiting, deadline, results)
        done = [features for features in results if features is not None]
        assert len(done) == len(images), "every image is either cached or collected"
        return done

    def _keys(self, images: list[ImageInput], pixels: PixelLimits | None) -> list[EmbeddingKey]:
        """The cache key of each image; raises InvalidInputError for a request that cannot be served."""
        if not images:
            raise InvalidInputError("no images given")
        if len(images) > self.config.max_images_per_request:
            raise InvalidInputError(
                f"{len(images)} images in one request, over the limit of {self.config.max_images_per_request}"
            )
        hashes = [verified_hash(i, image) for i, image in enumerate(images)]
        resize = self.resize.bounds(pixels)
        return [EmbeddingKey(self.model_key, digest, resize) for digest in hashes]

    def _check_hash_only_known(self, images: list[ImageInput], keys: list[EmbeddingKey]) -> None:
        """Hash-only images must be cached or being encoded. Checked before any work starts: on
        NotFoundError the caller resends the whole request with bytes."""
        missing = [
            i
            for i, (image, key) in enumerate(zip(images, keys, strict=True))
            if not image.data and key not in self._inflight and key not in self.cache
        ]
        if missing:
            raise NotFoundError(f"images {missing} are not in the embedding cache; send their bytes")

    def _check_room(self, misses: list[EmbeddingKey]) -> None:
        """A bounded queue: the images in work (preprocessing, queued or encoding) stay within
        max_queued_images, so that a flood of Embed calls is refused at once instead of piling up
        preprocessed pixels. A miss already being encoded joins that work and takes no room."""
        new = len({key for key in misses if key not in self._inflight})
        limit = self.config.max_queued_images
        if new and len(self._inflight) + new > limit:
            raise OverloadedError(
                f"{len(self._inflight)} images are being encoded and this request adds {new}, over the "
                f"limit of {limit} (VISION_MAX_QUEUED_IMAGES); retry later"
            )

    def _cached(self, key: EmbeddingKey) -> ImageFeatures | None:
        features = self.cache.get(key)
        if features is not None:
            self.metrics.images.labels("cached").inc()
        return features

    def _job_for(
        self, key: EmbeddingKey, data: bytes, deadline: float | None, batcher: EncodeBatcher
    ) -> EncodeJob:
        """The encoding of `key`: the one already under way (a coalesced miss), else a new one."""
        job = self._inflight.get(key)
        if job is not None:
            self.metrics.images.labels("coalesced").inc()
            job.waiters += 1
            job.extend_deadline(deadline)
            return job
        loop = asyncio.get_running_loop()
        job = EncodeJob(key, loop.create_future(), deadline=deadline)
        self._inflight[key] = job
        job.future.add_done_callback(functools.partial(self._finished, job))
        loop.create_task(self._prepare(job, data, batcher))
        return job

    async def _prepare(self, job: EncodeJob, data: bytes, batcher: EncodeBatcher) -> None:
        """Decode and preprocess off the event loop, then queue the job for the batcher."""
        started = time.monotonic()
        try:
            job.inputs = await self.preprocess(data, resize_options(job.key.resize))
        except Exception as exc:  # noqa: BLE001 - delivered to every waiter of this image
            self.metrics.images.labels("invalid").inc()
            if not job.future.done():
                job.future.set_exception(exc)
            return
        self.metrics.preprocess.observe(time.monotonic() - started)
        job.cost = self.adapter.cost(job.inputs)
        batcher.submit(job)

    def _finished(self, job: EncodeJob, future: asyncio.Future) -> None:
        """A job ends: it leaves the in-flight map, and its embedding (if any) goes to the cache, even
        when every request that wanted it has gone (the next one will find it)."""
        if self._inflight.get(job.key) is job:
            del self._inflight[job.key]
        if not future.cancelled() and future.exception() is None:
            self.cache.put(job.key, self._features(job, future.result()))

    async def _collect(
        self,
        waiting: list[tuple[int, EncodeJob]],
        deadline: float | None,
        results: list[ImageFeatures | None],
    ) -> None:
        """Fill results[i] from each (i, job) as the jobs finish, within the request's deadline."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                for i, job in waiting:
                    try:
                        # shielded: this request timing out must not cancel other waiters' encoding
                        embedding = await asyncio.shield(job.future)
                    except InvalidInputError as exc:
                        raise InvalidInputError(f"image {i}: {exc}") from None
                    results[i] = self._features(job, embedding)
        except TimeoutError:
            raise DeadlineError("the request deadline passed before its images were encoded") from None
        finally:
            for _, job in waiting:
                job.waiters -= 1

    def _features(self, job: EncodeJob, embedding: torch.Tensor) -> ImageFeatures:
        return ImageFeatures(embedding, job.key.content_hash, self._grid(job))

    def _grid(self, job: EncodeJob) -> tuple[int, ...]:
        return self.adapter.grid_thw(job.inputs) if job.inputs is not None else ()

    def is_alive(self) -> bool:
        """False once the encoder's forwards have failed for good (`health.reason` says why)."""
        return self.health.ok

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        self.preprocess.close()
