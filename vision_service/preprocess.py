"""Image decode + preprocessing in a worker pool, off the event loop.

Two pool kinds: threads (PIL and numpy release the GIL for most of the work; no copies between
processes) or processes (each loads its own image processor; inputs and outputs are pickled).
benchmarks/RESULTS.md records which wins on the benchmark machine and why.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from mmserve.images import decode_image

_worker_state: tuple[Any, Any] | None = None  # (adapter class, processor), set once in each worker process


def _preprocess(adapter, processor, data: bytes, max_pixels: int, options: dict) -> dict[str, np.ndarray]:
    # `options`: adapter keyword arguments (Qwen2-VL's min_pixels/max_pixels); empty for most families.
    return adapter.preprocess_one(processor, decode_image(data, max_pixels, what="image"), **options)


def _init_worker(adapter, checkpoint: str) -> None:
    global _worker_state
    torch.set_num_threads(1)  # the encoder owns the cores; a worker is one core's worth of work
    _worker_state = (adapter, adapter.load_processor(checkpoint))


def _ready() -> bool:
    return _worker_state is not None


def _preprocess_in_worker(data: bytes, max_pixels: int, options: dict) -> dict[str, np.ndarray]:
    assert _worker_state is not None, "worker not initialised"
    adapter, processor = _worker_state
    return _preprocess(adapter, processor, data, max_pixels, options)


class Preprocessor:
    def __init__(self, adapter, checkpoint: str, mode: str, workers: int, max_pixels: int):
        self.max_pixels = max_pixels
        self._executor: Executor
        if mode == "process":
            # spawn, not fork: forking a process that runs gRPC and torch threads is unsafe.
            spawn = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                workers, mp_context=spawn, initializer=_init_worker, initargs=(adapter, checkpoint)
            )
            self._fn = _preprocess_in_worker
            for future in [self._executor.submit(_ready) for _ in range(workers)]:
                future.result()  # start the workers now, not on the first request
        else:
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="vision-preprocess")
            self._fn = functools.partial(_preprocess, adapter, adapter.load_processor(checkpoint))

    async def __call__(self, data: bytes, options: dict | None = None) -> dict[str, torch.Tensor]:
        """Encoded image bytes -> model inputs of that one image (raises InvalidInputError).

        `options` are passed to the adapter's preprocess_one (e.g. min_pixels/max_pixels)."""
        arrays = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._fn, data, self.max_pixels, options or {}
        )
        return {name: torch.from_numpy(array) for name, array in arrays.items()}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
