"""The engine: an asyncio front door, and one worker thread running schedule -> forward -> sample.

Each step the scheduler picks the batch (continuous batching with chunked prefill over a paged KV
cache with prefix caching), the model runner computes it, the sampler picks the new tokens, and one
output loop hands each sequence's new token to its stream (one wake-up of the event loop per step).
`generate()` is an async stream of `GenerateOutput`s, each with every token ready when the caller asks
(one per step while it keeps up); leaving it early (a cancelled RPC) aborts the sequence, and the worker frees its
blocks before its next step. A bounded queue answers OverloadedError when full. What happens is
counted in `stats` (an EngineStats; llm_service/metrics.py exports it).
A failed step fails its batch (UNAVAILABLE); a few in a row, or a fatal one, stop the engine
(`health`): the rest end UNAVAILABLE with the reason and `is_alive()` (gRPC health) turns false.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch

from llm_service.attention import backend_block_size, make_backend, resolve_backend
from llm_service.engine import compiled_decode
from llm_service.engine.block_manager import BlockManager
from llm_service.engine.config import EngineConfig
from llm_service.engine.model_runner import ModelRunner, kv_cache_bytes_per_block, num_kv_blocks
from llm_service.engine.scheduler import Scheduler, SchedulerOutput
from llm_service.engine.sequence import ImageKey, Sequence, image_keys
from llm_service.engine.stats import EngineStats
from llm_service.engine.stream import RequestStream, wake
from llm_service.engine.validation import check_request
from llm_service.metrics import EngineMetrics
from llm_service.sampler import make_generator, nonfinite_rows, sample
from mmserve.errors import InvalidInputError, OverloadedError, UnavailableError
from mmserve.step_health import StepHealth, describe
from mmserve.structured import MatcherFactory
from mmserve.wire import FinishReason, GenerateOutput, GenerateRequest, LLMInfo, TokenLogprobs, Usage

if TYPE_CHECKING:
    from llguidance import LLMatcher

log = logging.getLogger(__name__)
Sampled = tuple[list[int], list[TokenLogprobs | None]]  # each row's token, and its logprobs if asked

_NONFINITE = (
    "the model's logits became NaN/Inf at output token {}; the request's inputs (e.g. image "
    "embeddings of extreme magnitude) are outside what the model can compute with"
)


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(**overrides)
        self.model = model
        self.config = config
        backend = resolve_backend(config.attention_backend, model.device)
        block_size = backend_block_size(backend, config.block_size)
        num_blocks = num_kv_blocks(model, block_size, config.kv_cache_bytes)
        self.max_model_len = min(
            config.max_model_len or model.max_model_len, model.max_model_len, num_blocks * block_size
        )
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_running, config.max_num_batched_tokens)
        attention = make_backend(backend, block_size, model.device, config.decode_staging_bytes)
        compile_decode, why = compiled_decode.wanted(config.compile, backend, model.device)
        log.info(
            "engine: %s weights, %s attention, %d KV blocks x %d tokens (%.2f GiB), max_model_len %d, "
            "compiled decode step %s",
            str(model.dtype).removeprefix("torch."),
            backend,
            num_blocks,
            block_size,
            num_blocks * kv_cache_bytes_per_block(model, block_size) / 2**30,
            self.max_model_len,
            why,
        )
        self.runner = ModelRunner(model, attention, num_blocks, compile_decode)
        self.matchers = MatcherFactory(
            model.family, getattr(model, "tokenizer_path", None), model.vocab_size, model.eos_token_ids
        )
        self.stats = EngineStats(kv_blocks=num_blocks)
        self.metrics = EngineMetrics(self.stats)  # its registry is served on --metrics-port
        self._streams: dict[Sequence, RequestStream] = {}
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted and not yet running (guarded by _lock)
        self._stopped = False
        self.health = StepHealth()  # read by is_alive(): the gRPC health of the service
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- public API (event-loop side) ----------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        # Hashing megabytes of embeddings, compiling a grammar (and loading the tokenizer for the first
        # one): not on the event loop.
        if request.images or request.sampling.structured is not None:
            keys, matcher = await asyncio.to_thread(self.admit, request)
        else:
            keys, matcher = self.admit(request)
        seq = Sequence(request, keys)
        seq.generator = make_generator(request.sampling)
        seq.matcher = matcher
        stream = self._submit(seq)
        finished = False
        try:
            while True:
                try:
                    item = await stream.get()  # every output ready: one message for a caller behind
                except Exception:
                    finished = True
                    raise
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                stream.closed = True  # read by the worker at its next step, which frees the blocks
                self._inbox.put(None)  # wake it if idle

    def _submit(self, seq: Sequence) -> RequestStream:
        stream = RequestStream(asyncio.get_running_loop())
        with self._lock:  # the put happens under the lock so that stop() cannot strand it
            if self._stopped or not self._thread.is_alive():
                raise UnavailableError(self._stop_reason())
            if self._num_waiting >= self.config.max_waiting:
                raise OverloadedError(f"waiting queue is full ({self.config.max_waiting} requests)")
            self._num_waiting += 1
            self._streams[seq] = stream
            self._inbox.put(seq)
        return stream

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
        """False once the engine stopped: asked to, or failed (its `health.reason` says why)."""
        return self._thread.is_alive() and not self._stopped

    def _stop_reason(self) -> str:
        if self.health.reason is not None:
            return f"the engine failed and needs a restart: {self.health.reason}"
        return "the engine is not running"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def validate(self, request: GenerateRequest) -> None:
        """Reject malformed requests before they reach the worker (INVALID_ARGUMENT)."""
        check_request(request, self.model, self.max_model_len)

    def admit(self, request: GenerateRequest) -> tuple[list[ImageKey], LLMatcher | None]:
        """Validate a request; compute its images' prefix-cache keys (from the embedding bytes it
        carries) and its structured-output matcher. Reads every embedding value twice, and may compile
        a grammar: run it off the event loop for image and structured requests."""
        self.validate(request)
        structured = request.sampling.structured
        matcher = None if structured is None else self.matchers.matcher(structured)
        return image_keys(request), matcher

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
            reason = "the engine stopped" if self.health.ok else self._stop_reason()
            for stream in list(self._streams.values()):
                stream.put(UnavailableError(reason))

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
            self._fail_unschedulable()
            return
        try:
            sampling, logits = self.runner.execute(plan)
            self.scheduler.update(plan)
            rows, poisoned, (tokens, logprobs) = self._sample([item.seq for item in sampling], logits)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the engine
            self._step_failed(plan, exc)
            return
        self.health.succeeded()
        for seq in poisoned:
            self._fail(seq, InvalidInputError(_NONFINITE.format(len(seq.output_token_ids))))
        now = time.monotonic()
        streams = [
            self._append(seq, token, token_logprobs, now)
            for seq, token, token_logprobs in zip(rows, tokens, logprobs, strict=True)
        ]
        wake(streams)  # one call into the event loop for the whole step, not one per sequence

    def _sample(
        self, rows: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], list[Sequence], Sampled]:
        """-> (the rows that sampled, the rows whose logits are NaN/Inf, (their tokens, logprobs))."""
        poisoned = set(nonfinite_rows(logits)) if rows else set()
        bad = [seq for i, seq in enumerate(rows) if i in poisoned]
        if poisoned:  # only those rows end; the rest of the batch samples as usual
            kept = [i for i in range(len(rows)) if i not in poisoned]
            logits, rows = logits[kept], [rows[i] for i in kept]
        return rows, bad, sample(logits, rows, self.model.eos_token_ids) if rows else ([], [])

    def _step_failed(self, plan: SchedulerOutput, exc: Exception) -> None:
        """Fail the batch's requests with the error named; stop the engine when it has failed for good."""
        log.exception("a step of %d sequences failed", len(plan.scheduled))
        failed_for_good = self.health.failed(exc, "engine step")
        message = f"the engine step running this request failed ({describe(exc)})"
        for item in plan.scheduled:
            self._fail(item.seq, UnavailableError(message))
        if failed_for_good:
            log.error("stopping the engine: %s", self.health.reason)
            with self._lock:  # the loop ends; every request still in the engine gets the reason
                self._stopped = True

    def _fail_unschedulable(self) -> None:
        """Cannot happen while max_model_len <= the cache's tokens (a lone sequence always fits); if
        it ever does, fail the head of the queue rather than spin."""
        if self.scheduler.waiting and not self.scheduler.running:
            seq = self.scheduler.waiting[0]
            log.error("request %s cannot be scheduled on an empty engine", seq.request_id)
            self._fail(seq, UnavailableError("the request does not fit in the KV cache"))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End `seq`'s stream with `error` and free its blocks."""
        self._streams[seq].put(error)
        self._finish(seq, "error")

    def _append(
        self, seq: Sequence, token: int, token_logprobs: TokenLogprobs | None, now: float
    ) -> RequestStream:
        """The output loop for one sequence: record the token, decide whether it ends, queue it on the
        sequence's stream (returned: the step wakes its streams' callers once, at its end)."""
        seq.append_token(token)
        self.stats.token(seq, now)
        seq.last_token_at = now
        if seq.matcher is not None and (not seq.matcher.consume_token(token) or seq.matcher.is_error()):
            # The grammar's parser stopped (a limit on its work per token, mmserve.structured): this
            # request's fault, and only this request fails (INVALID_ARGUMENT: the replica stays in the pool).
            log.warning(
                "request %s: structured output stopped: %s", seq.request_id, seq.matcher.get_error()[:200]
            )
            stream = self._streams[seq]
            error = f"structured output stopped at output token {len(seq.output_token_ids)}: {seq.matcher.get_error()}"
            self._fail(seq, InvalidInputError(error[:500]))
            return stream
        reason = self._finish_reason(seq, token)
        output = GenerateOutput([token], logprobs=None if token_logprobs is None else [token_logprobs])
        if reason is not None:
            output.finish_reason = reason
            output.usage = Usage(seq.num_prompt_tokens, len(seq.output_token_ids), seq.num_cached_tokens)
        stream = self._streams[seq]
        stream.push(output)
        if reason is not None:
            self.stats.e2e.observe(now - seq.arrival)
            self._finish(seq, reason.value)
        return stream

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if not params.ignore_eos and token in self.model.eos_token_ids:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if seq.matcher is not None and seq.matcher.is_stopped():  # the text is complete: nothing may follow
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
        self.stats.request_finished(outcome)
        self.stats.state(self.scheduler, self.block_manager)  # now: an idle engine has no next step

    def _observe_schedule(self, plan: SchedulerOutput) -> None:
        now = time.monotonic()
        for item in plan.scheduled:
            seq = item.seq
            if seq.first_scheduled_at is None:  # it leaves the admission queue
                seq.first_scheduled_at = now
                with self._lock:
                    self._num_waiting -= 1
                self.stats.first_scheduled(seq, now)
        self.stats.step_scheduled(plan)
        self.stats.state(self.scheduler, self.block_manager)
