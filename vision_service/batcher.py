"""Cross-request batching of encoder forwards.

Preprocessed images of any requests wait in one queue. The loop takes the first, waits up to
`max_wait` for more (up to `max_batch`), drops jobs nobody waits for any more or whose deadline
passed, and runs one forward for the rest on a single encoder thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mmserve.errors import DeadlineError

log = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """One distinct image to encode; several requests may wait on it (coalesced misses)."""

    key: str
    future: asyncio.Future
    inputs: dict[str, torch.Tensor] | None = None
    deadline: float | None = None  # time.monotonic() seconds; None = no deadline
    waiters: int = 1
    queued_at: float = field(default_factory=time.monotonic)

    def extend_deadline(self, deadline: float | None) -> None:
        if self.deadline is not None:
            self.deadline = None if deadline is None else max(self.deadline, deadline)


class EncodeBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[dict[str, torch.Tensor]]], list[torch.Tensor]],
        max_batch: int,
        max_wait_s: float,
        metrics,
    ):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._queue: asyncio.Queue[EncodeJob] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-encode")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, job: EncodeJob) -> None:
        job.queued_at = time.monotonic()
        self._queue.put_nowait(job)

    async def _next_batch(self) -> list[EncodeJob]:
        batch = [await self._queue.get()]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
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
            for job in batch:
                self.metrics.queue_time.observe(now - job.queued_at)
            started = time.monotonic()
            try:
                inputs = [job.inputs for job in batch if job.inputs is not None]
                embeddings = await loop.run_in_executor(self._executor, self._run_batch, inputs)
            except Exception as exc:  # noqa: BLE001 - reported to every waiter, the loop goes on
                log.exception("encoder forward failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.metrics.encode.observe(time.monotonic() - started)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.images.labels("encoded").inc(len(batch))
            for job, embedding in zip(batch, embeddings, strict=True):
                if not job.future.done():
                    job.future.set_result(embedding)

    def close(self) -> None:
        self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
