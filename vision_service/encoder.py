"""Images -> embeddings: decode, preprocess and encode with the family's vision adapter."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from mmserve.checkpoint import detect_family, parse_dtype
from mmserve.errors import InvalidInputError
from mmserve.images import content_hash, decode_image
from mmserve.wire import ImageFeatures, ImageInput
from vision_service.config import VisionConfig
from vision_service.metrics import VisionMetrics
from vision_service.models import VISION_ADAPTERS

log = logging.getLogger(__name__)


class VisionEncoder:
    def __init__(self, config: VisionConfig):
        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.family = detect_family(config.checkpoint, config.model_type)
        self.dtype = parse_dtype(config.dtype)
        adapter = VISION_ADAPTERS[self.family]
        self.model, self.processor = adapter.from_checkpoint(config.checkpoint, self.dtype, config.device)
        self.hidden_size = self.model.config.text_config.hidden_size
        self.metrics = VisionMetrics()
        # One worker: forwards run one at a time, off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-encode")
        log.info("vision model %s loaded from %s (%s)", self.family, config.checkpoint, config.dtype)

    def embed(self, images: list[ImageInput]) -> list[ImageFeatures]:
        if not images:
            raise InvalidInputError("no images given")
        limit = self.config.max_images_per_request
        if len(images) > limit:
            raise InvalidInputError(f"{len(images)} images in one request, over the limit of {limit}")
        started = time.monotonic()
        try:
            decoded = [
                decode_image(image.data, self.config.max_image_pixels, what=f"image {i}")
                for i, image in enumerate(images)
            ]
            inputs = self.model.preprocess(self.processor, decoded)
        except InvalidInputError:
            self.metrics.images.labels("invalid").inc(len(images))
            raise
        encode_started = time.monotonic()
        self.metrics.preprocess.observe(encode_started - started)
        embeddings = self.model(**inputs)
        self.metrics.encode.observe(time.monotonic() - encode_started)
        self.metrics.batch_size.observe(len(images))
        self.metrics.images.labels("ok").inc(len(images))
        return [
            ImageFeatures(
                embedding=emb.to("cpu").contiguous(),
                content_hash=image.content_hash or content_hash(image.data),
                grid_thw=self.model.grid_thw(inputs, i),
            )
            for i, (image, emb) in enumerate(zip(images, embeddings, strict=True))
        ]

    async def embed_async(self, images: list[ImageInput]) -> list[ImageFeatures]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.embed, images)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
