"""Cross-request batching of encoder forwards.

Preprocessed images of any requests wait in one queue. The loop takes the first, waits up to
`max_wait` for more (up to `max_batch`), drops jobs nobody waits for any more or whose deadline
passed, and runs one forward for the rest on a single encoder thread. A failed forward fails only its
images (UNAVAILABLE naming the error); a few in a row, or a fatal one, fail the encoder for good
(`health`): every later image is refused with the reason, and the service's health turns NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mmserve.errors import DeadlineError, OverloadedError, UnavailableError
from mmserve.step_health import StepHealth, describe
from vision_service.cache import EmbeddingKey
from vision_service.metrics import VisionMetrics

log = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """One distinct image to encode; several requests may wait on it (coalesced misses)."""

    key: EmbeddingKey
    future: asyncio.Future
    inputs: dict[str, torch.Tensor] | None = None
    deadline: float | None = None  # time.monotonic() seconds; None = no deadline
    waiters: int = 1
    queued_at: float = field(default_factory=time.monotonic)
    cost: int = 0  # encoder work in patches (dynamic-resolution families); 0 = counted by images only

    def extend_deadline(self, deadline: float | None) -> None:
        if self.deadline is not None:
            self.deadline = None if deadline is None else max(self.deadline, deadline)


class EncodeBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[dict[str, torch.Tensor]]], list[torch.Tensor]],
        max_batch: int,
        max_wait_s: float,
        metrics: VisionMetrics,
        max_batch_cost: int = 1 << 62,
        health: StepHealth | None = None,
    ):
        self._run_batch = run_batch
        self.health = health or StepHealth()  # the encoder's, shared by the batchers it makes
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_batch_cost = max_batch_cost
        self.metrics = metrics
        self._queue: asyncio.Queue[EncodeJob] = asyncio.Queue()
        self._carry: EncodeJob | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-encode")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, job: EncodeJob) -> None:
        job.queued_at = time.monotonic()
        self._queue.put_nowait(job)

    async def _next_batch(self) -> list[EncodeJob]:
        """Up to max_batch images and max_batch_cost patches (a single larger image runs alone)."""
        if self._carry is not None:
            batch, self._carry = [self._carry], None
        else:
            batch = [await self._queue.get()]
        cost = batch[0].cost
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if cost + job.cost > self.max_batch_cost:
                self._carry = job  # first in the next forward
                break
            batch.append(job)
            cost += job.cost
        return batch

    def _still_wanted(self, job: EncodeJob, now: float) -> bool:
        if job.future.done():
            return False
        if job.waiters <= 0:
            job.future.cancel()
            self.metrics.images.labels("abandoned").inc()
            return False
        if job.deadline is not None and now > job.deadline:
            job.future.set_exception(DeadlineError("the request deadline passed while the image was queued"))
            self.metrics.images.labels("expired").inc()
            return False
        return True

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            now = time.monotonic()
            batch = [job for job in batch if self._still_wanted(job, now)]
            if not batch:
                continue
            if not self.health.ok:
                self._refuse(batch)
                continue
            for job in batch:
                self.metrics.queue_time.observe(now - job.queued_at)
            await self._encode(batch, loop)

    async def _encode(self, batch: list[EncodeJob], loop) -> None:
        started = time.monotonic()
        try:
            inputs = [job.inputs for job in batch if job.inputs is not None]
            embeddings = await loop.run_in_executor(self._executor, self._run_batch, inputs)
        except Exception as exc:  # noqa: BLE001 - reported to the waiters, the loop goes on
            if len(batch) > 1:  # find the image at fault: the others of the batch must not fail with it
                log.warning("a batch of %d failed (%s); encoding its images one by one", len(batch), exc)
                for job in batch:
                    await self._encode([job], loop)
                return
            self._failed(batch[0], exc)
            return
        self.health.succeeded()
        self.metrics.encode.observe(time.monotonic() - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.images.labels("encoded").inc(len(batch))
        for job, embedding in zip(batch, embeddings, strict=True):
            if not job.future.done():
                job.future.set_result(embedding)

    def _failed(self, job: EncodeJob, exc: Exception) -> None:
        """One image's forward failed: its waiters get a clean error, and the health counts it."""
        log.exception("encoder forward failed")
        if isinstance(exc, MemoryError | torch.OutOfMemoryError):
            error: Exception = OverloadedError("not enough memory to encode this image now")
        else:
            error = UnavailableError(f"the vision encoder's forward failed ({describe(exc)})")
        if self.health.failed(exc, "encoder forward"):
            log.error("the vision encoder failed: %s", self.health.reason)
        if not job.future.done():
            job.future.set_exception(error)

    def _refuse(self, batch: list[EncodeJob]) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(UnavailableError(unhealthy_message(self.health)))

    def close(self) -> None:
        self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def unhealthy_message(health: StepHealth) -> str:
    return f"the vision encoder failed and needs a restart: {health.reason}"
