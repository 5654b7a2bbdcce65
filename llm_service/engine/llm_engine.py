"""The engine: an asyncio front door, and one worker thread running schedule -> forward -> sample.

Each step the scheduler picks the batch (continuous batching with chunked prefill over a paged KV
cache with prefix caching), the model runner computes it, the sampler picks the new tokens, and one
output loop hands each sequence's new token to its stream. `generate()` is an async stream of
`GenerateOutput`s; leaving it early (a cancelled RPC) aborts the sequence, and the worker frees its
blocks before its next step. A bounded queue answers OverloadedError when full.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from llm_service.attention import BACKENDS, FLASH_BLOCK_SIZE, resolve_backend
from llm_service.engine.block_manager import BlockManager
from llm_service.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
from llm_service.engine.scheduler import Scheduler, SchedulerOutput
from llm_service.engine.sequence import ImageKey, Sequence, image_keys
from llm_service.engine.validation import RequestLimits, validate_request
from llm_service.metrics import EngineMetrics
from llm_service.sampler import make_generator, sample
from mmserve.errors import OverloadedError, UnavailableError
from mmserve.wire import FinishReason, GenerateOutput, GenerateRequest, LLMInfo, Usage

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
GPU_MEMORY_FRACTION = 0.9  # of the memory free after loading the weights, when no budget is set


@dataclass
class EngineConfig:
    max_waiting: int = 256  # requests queued beyond this get OverloadedError (RESOURCE_EXHAUSTED)
    max_running: int = 128  # sequences in the running batch at once
    max_model_len: int = 0  # prompt + output cap per sequence; 0 = the model's (and the cache's) limit
    max_num_batched_tokens: int = 2048  # tokens per step: the chunked-prefill budget
    kv_cache_bytes: int = 0  # KV cache budget; 0 = 2 GiB on CPU, 90% of free memory on CUDA
    block_size: int = 16  # tokens per KV block (flash-attn raises it to 256)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | sdpa | flash_attn
    decode_staging_bytes: int = 512 << 20  # sdpa: contiguous copies of the decodes' KV; 0 = off

    def __post_init__(self):
        if min(self.max_waiting, self.max_running, self.max_num_batched_tokens, self.block_size) < 1:
            raise ValueError("max_waiting, max_running, max_num_batched_tokens and block_size must be >= 1")
        if min(self.max_model_len, self.kv_cache_bytes, self.decode_staging_bytes) < 0:
            raise ValueError("max_model_len, kv_cache_bytes and decode_staging_bytes must be >= 0")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")


class _Stream:
    """The bridge from the worker thread to one caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.closed = True


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(**overrides)
        self.model = model
        self.config = config
        backend = resolve_backend(config.attention_backend, model.device)
        block_size = FLASH_BLOCK_SIZE if backend == "flash_attn" else config.block_size
        num_blocks = self._num_blocks(config.kv_cache_bytes, kv_cache_bytes_per_block(model, block_size))
        self.max_model_len = min(
            config.max_model_len or model.max_model_len, model.max_model_len, num_blocks * block_size
        )
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_running, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, backend, config.decode_staging_bytes)
        log.info(
            "engine: %s weights, %s attention, %d KV blocks x %d tokens (%.2f GiB), max_model_len %d",
            str(model.dtype).removeprefix("torch."),
            backend,
            num_blocks,
            block_size,
            num_blocks * kv_cache_bytes_per_block(model, block_size) / 2**30,
            self.max_model_len,
        )
        self.metrics = EngineMetrics()
        self.metrics.kv_blocks.set(num_blocks)
        self._streams: dict[Sequence, _Stream] = {}
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted and not yet running (guarded by _lock)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def _num_blocks(self, budget: int, per_block: int) -> int:
        if not budget:
            if self.model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.model.device)
                budget = int(free * GPU_MEMORY_FRACTION)
            else:
                budget = DEFAULT_CPU_KV_CACHE_BYTES
        if budget < per_block:
            raise ValueError(
                f"the KV cache budget ({budget} bytes) is less than one block ({per_block} bytes)"
            )
        return budget // per_block

    # ---- public API (event-loop side) ----------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if request.images:  # scanning and hashing megabytes of embeddings: not on the event loop
            keys = await asyncio.to_thread(self.admit, request)
        else:
            keys = self.admit(request)
        seq = Sequence(request, keys)
        seq.generator = make_generator(request.sampling)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:  # the put happens under the lock so that stop() cannot strand it
            if self._stopped or not self._thread.is_alive():
                raise UnavailableError("the engine is not running")
            if self._num_waiting >= self.config.max_waiting:
                raise OverloadedError(f"waiting queue is full ({self.config.max_waiting} requests)")
            self._num_waiting += 1
            self._streams[seq] = stream
            self._inbox.put(seq)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                stream.closed = True  # read by the worker at its next step, which frees the blocks
                self._inbox.put(None)  # wake it if idle

    def info(self) -> LLMInfo:
        model = self.model
        return LLMInfo(
            model.family,
            self.max_model_len,
            model.image_token_id,
            model.hidden_size,
            tuple(model.eos_token_ids),
            str(model.dtype).removeprefix("torch."),
        )

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def validate(self, request: GenerateRequest) -> None:
        """Reject malformed requests before they reach the worker (INVALID_ARGUMENT)."""
        model = self.model
        validate_request(
            request,
            RequestLimits(
                model.vocab_size, self.max_model_len, model.image_token_id, model.hidden_size, model.dtype
            ),
        )
        if hasattr(model, "validate_request"):  # family-specific checks (e.g. Qwen2-VL's grid_thw)
            model.validate_request(request)

    def admit(self, request: GenerateRequest) -> list[ImageKey]:
        """Validate a request and compute its images' prefix-cache keys (from the embedding bytes it
        carries). Reads every embedding value twice: run it off the event loop for image requests."""
        self.validate(request)
        return image_keys(request)

    # ---- worker thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stopped:
                self._receive(block=not self.scheduler.has_work())
                self._drop_cancelled()
                if self.scheduler.has_work():
                    self._step()
        except BaseException:
            log.exception("the engine loop died; failing every request")
            raise
        finally:
            with self._lock:  # no new request can enter past this point
                self._stopped = True
            self._receive(block=False)
            for stream in list(self._streams.values()):
                stream.put(UnavailableError("the engine stopped"))

    def _receive(self, block: bool) -> None:
        """Move submitted sequences into the scheduler (blocking while there is nothing to do)."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    self.scheduler.add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for seq, stream in list(self._streams.items()):
            if stream.closed:
                self._finish(seq, FinishReason.ABORT.value)

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        self._observe_schedule(plan)
        if not plan.scheduled:
            # Cannot happen while max_model_len <= the cache's tokens (a lone sequence always fits);
            # if it ever does, fail the head of the queue rather than spin.
            if self.scheduler.waiting and not self.scheduler.running:
                seq = self.scheduler.waiting[0]
                log.error("request %s cannot be scheduled on an empty engine", seq.request_id)
                self._streams[seq].put(UnavailableError("the request does not fit in the KV cache"))
                self._finish(seq, "error")
            return
        try:
            sampling, logits = self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the engine
            log.exception("a step of %d sequences failed", len(plan.scheduled))
            for item in plan.scheduled:
                self._streams[item.seq].put(exc)
                self._finish(item.seq, "error")
            return
        self.scheduler.update(plan)
        if not sampling:
            return
        rows = [item.seq for item in sampling]
        tokens, logprobs = sample(logits, rows, self.model.eos_token_ids)
        now = time.monotonic()
        for seq, token, token_logprobs in zip(rows, tokens, logprobs, strict=True):
            self._append(seq, token, token_logprobs, now)
        self.metrics.generated_tokens.inc(len(tokens))

    def _append(self, seq: Sequence, token: int, token_logprobs, now: float) -> None:
        """The output loop for one sequence: record the token, decide whether it ends, stream it."""
        seq.append_token(token)
        if len(seq.output_token_ids) == 1:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - (seq.last_token_at or now))
        seq.last_token_at = now
        reason = self._finish_reason(seq, token)
        output = GenerateOutput([token], logprobs=None if token_logprobs is None else [token_logprobs])
        if reason is not None:
            output.finish_reason = reason
            output.usage = Usage(seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens)
        self._streams[seq].put(output)
        if reason is not None:
            self.metrics.e2e.observe(now - seq.arrival)
            self._finish(seq, reason.value)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if not params.ignore_eos and token in self.model.eos_token_ids:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, outcome: str) -> None:
        self.scheduler.finish(seq)  # frees its blocks now
        del self._streams[seq]
        if seq.first_scheduled_at is None:  # it never left the admission queue
            with self._lock:
                self._num_waiting -= 1
        self.metrics.finished.labels(outcome).inc()
        self._observe_state()  # at once, not at the next step: an idle engine has no next step

    def _observe_schedule(self, plan: SchedulerOutput) -> None:
        now = time.monotonic()
        for item in plan.scheduled:
            seq = item.seq
            if seq.first_scheduled_at is None:  # it leaves the admission queue
                seq.first_scheduled_at = now
                with self._lock:
                    self._num_waiting -= 1
                self.metrics.queue_time.observe(now - seq.arrival)
                self.metrics.prompt_tokens.inc(seq.num_prompt_tokens)
                self.metrics.cached_prompt_tokens.inc(seq.num_cached_tokens)
        self.metrics.preemptions.inc(len(plan.preempted))
        self.metrics.step_tokens.observe(plan.num_tokens)
        self._observe_state()

    def _observe_state(self) -> None:
        manager = self.block_manager
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_usage.set(manager.usage())
        self.metrics.prefix_queries.set(manager.prefix_queries)
        self.metrics.prefix_hits.set(manager.prefix_hits)
