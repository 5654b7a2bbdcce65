"""A simple generation engine: one worker thread interleaving sequences one step at a time.

Each running sequence owns its own KV cache and advances by one forward per turn (prefill, then one
token per decode step), round-robin, so a long prompt never blocks other requests for more than
one forward. The interface is the one a batching engine keeps: `generate()` is an async stream of
`GenerateOutput`s keyed by request id, cancelling the stream aborts the sequence and frees its
cache, and a bounded queue answers OverloadedError when full.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llm_service.metrics import EngineMetrics
from llm_service.sampler import make_generator, sample_next
from mmserve.errors import InvalidInputError, OverloadedError, UnavailableError
from mmserve.wire import FinishReason, GenerateOutput, GenerateRequest, LLMInfo, Usage

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    rope_delta: int | None = None  # M-RoPE models: decode position = absolute index + rope_delta
    aborted: bool = False
    arrival: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.aborted = True


class Engine:
    def __init__(self, model, max_waiting: int = 256, max_model_len: int = 0, max_running: int = 8):
        self.model = model
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.max_model_len = min(max_model_len or model.max_model_len, model.max_model_len)
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._running: list[Sequence] = []
        self._pending: collections.deque[Sequence] = collections.deque()  # admitted in arrival order
        self._lock = threading.Lock()
        self._waiting = 0
        self._stopped = False
        self.metrics = EngineMetrics()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- public API (event-loop side) ----------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.validate(request)
        seq = Sequence(request, asyncio.get_running_loop(), asyncio.Queue(), make_generator(request.sampling))
        with self._lock:  # the put happens under the lock so that stop() cannot strand it
            if self._stopped or not self._thread.is_alive():
                raise UnavailableError("the engine is not running")
            if self._waiting >= self.max_waiting:
                raise OverloadedError(f"waiting queue is full ({self.max_waiting} requests)")
            self._waiting += 1
            self.metrics.waiting.set(self._waiting)
            self._inbox.put(seq)
        finished = False
        try:
            while True:
                item = await seq.outputs.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                seq.aborted = True  # read by the engine thread at its next step
                self._inbox.put(None)  # wake it if idle

    def info(self) -> LLMInfo:
        model = self.model
        return LLMInfo(
            model.family,
            self.max_model_len,
            model.image_token_id,
            model.hidden_size,
            tuple(model.eos_token_ids),
        )

    def num_running(self) -> int:
        return len(self._running)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def validate(self, request: GenerateRequest) -> None:
        """Reject malformed requests before they reach the worker (INVALID_ARGUMENT)."""
        ids, params, model = request.token_ids, request.sampling, self.model
        if not request.request_id:
            raise InvalidInputError("request_id is empty")
        if not ids:
            raise InvalidInputError("token_ids is empty")
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise InvalidInputError(f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise InvalidInputError(
                f"prompt has {len(ids)} tokens; the model accepts at most {self.max_model_len - 1}"
            )
        if params.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.min_new_tokens < 0 or params.temperature < 0 or not 0 <= params.top_p <= 1:
            raise InvalidInputError("min_new_tokens and temperature must be >= 0 and top_p in [0, 1]")
        if params.repetition_penalty <= 0:
            raise InvalidInputError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
        covered = 0
        end = 0
        for i, span in enumerate(request.images):
            rows = tuple(span.embedding.shape)
            if span.length < 1:
                raise InvalidInputError(f"image span {i} has length {span.length}; it must be >= 1")
            if span.offset < end:
                raise InvalidInputError(
                    f"image span {i} at offset {span.offset} overlaps or precedes the previous span"
                )
            if len(rows) != 2 or rows[1] != model.hidden_size:
                raise InvalidInputError(
                    f"image span {i}: embedding shape {list(rows)} is not [N, {model.hidden_size}]"
                )
            if span.length != rows[0]:
                raise InvalidInputError(
                    f"image span {i}: length {span.length} differs from its {rows[0]} embedding rows"
                )
            if span.offset + span.length > len(ids):
                raise InvalidInputError(
                    f"image span {i} [{span.offset}, {span.offset + span.length}) exceeds the {len(ids)} prompt tokens"
                )
            if any(t != model.image_token_id for t in ids[span.offset : span.offset + span.length]):
                raise InvalidInputError(
                    f"image span {i} covers tokens other than the image placeholder id {model.image_token_id}"
                )
            end = span.offset + span.length
            covered += span.length
        placeholders = sum(1 for t in ids if t == model.image_token_id)
        if placeholders != covered:
            raise InvalidInputError(
                f"prompt has {placeholders} image placeholder tokens but the image spans cover {covered}"
            )
        if hasattr(model, "validate_request"):  # family-specific checks (e.g. Qwen2-VL's grid_thw)
            model.validate_request(request)

    # ---- worker thread --------------------------------------------------------------------------

    def _receive(self, block: bool) -> None:
        """Move new sequences from the inbox to the pending queue (blocking when idle)."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    self._pending.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        while self._pending and len(self._running) < self.max_running:
            seq = self._pending.popleft()
            with self._lock:
                self._waiting -= 1
                self.metrics.waiting.set(self._waiting)
            self._running.append(seq)
            self.metrics.running.set(len(self._running))
            self.metrics.queue_time.observe(time.monotonic() - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.request.token_ids))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stopped:
                self._receive(block=not self._running and not self._pending)
                for seq in [s for s in self._pending if s.aborted]:  # cancelled while waiting
                    self._pending.remove(seq)
                    with self._lock:
                        self._waiting -= 1
                self._admit()
                for seq in list(self._running):
                    if seq.aborted:
                        self._finish(seq, None)
                        continue
                    try:
                        self._step(seq)
                    except Exception as exc:  # noqa: BLE001 - one bad sequence must not stop the engine
                        log.exception("request %s failed", seq.request_id)
                        seq.emit(exc)
                        self._finish(seq, None, outcome="error")
        except BaseException:
            log.exception("the engine loop died; failing every request")
            raise
        finally:
            with self._lock:  # no new request can enter past this point
                self._stopped = True
            self._receive(block=False)
            for seq in self._running + list(self._pending):
                seq.emit(UnavailableError("the engine stopped"))

    def _step(self, seq: Sequence) -> None:
        model = self.model
        # Models with their own positions (Qwen2-VL's M-RoPE) get them explicitly; others (LLaVA) do not.
        positioned = hasattr(model, "prompt_positions")
        kwargs = {}
        if seq.cache is None:
            embeds = self._prompt_embeddings(seq.request)
            seq.cache = DynamicCache()
            if positioned:
                kwargs["positions"], seq.rope_delta = model.prompt_positions(seq.request)
        else:
            embeds = model.embed_tokens(torch.tensor([seq.output_ids[-1]]))
            if positioned:
                index = len(seq.request.token_ids) + len(seq.output_ids) - 1
                kwargs["positions"] = model.decode_positions(index + (seq.rope_delta or 0))
        logits = model.forward(embeds[None], seq.cache, **kwargs)
        params = seq.request.sampling
        token = sample_next(
            logits,
            params,
            seq.request.token_ids + seq.output_ids if params.repetition_penalty != 1.0 else [],
            len(seq.output_ids),
            model.eos_token_ids,
            seq.generator,
        )
        seq.output_ids.append(token)
        self._observe_token(seq)
        reason = self._finish_reason(seq, token)
        if reason is None:
            seq.emit(GenerateOutput(token_ids=[token]))
            return
        usage = Usage(prompt_tokens=len(seq.request.token_ids), completion_tokens=len(seq.output_ids))
        seq.emit(GenerateOutput(token_ids=[token], finish_reason=reason, usage=usage))
        self._finish(seq, reason)

    def _prompt_embeddings(self, request: GenerateRequest) -> torch.Tensor:
        ids = torch.tensor(request.token_ids)
        embeds = self.model.embed_tokens(ids)  # (T, hidden)
        for span in request.images:
            embeds[span.offset : span.offset + span.length] = span.embedding.to(embeds.device, embeds.dtype)
        return embeds

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.request.sampling
        if not params.ignore_eos and token in self.model.eos_token_ids:
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= params.max_new_tokens:
            return FinishReason.LENGTH
        if len(seq.request.token_ids) + len(seq.output_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _observe_token(self, seq: Sequence) -> None:
        now = time.monotonic()
        if len(seq.output_ids) == 1:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generated_tokens.inc()

    def _finish(self, seq: Sequence, reason: FinishReason | None, outcome: str = "abort") -> None:
        seq.cache = None  # frees the KV memory
        self._running.remove(seq)
        self.metrics.running.set(len(self._running))
        self.metrics.finished.labels(reason.value if reason else outcome).inc()
        self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        if reason is None:
            log.info("request %s aborted after %d tokens", seq.request_id, len(seq.output_ids))
