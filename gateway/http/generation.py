"""A chat or text completion past its route: its settings, its generation, its response, its metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.http.context import Served
from gateway.http.deadline import RequestDeadline
from gateway.http.disconnect import cancel_on_disconnect
from gateway.http.errors import clip
from gateway.http.render import FinishedChoice, Render
from gateway.http.streaming import MeteredStream
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.serving import PreparedPrompt, TextDelta, TokenLogprob
from mmserve.errors import InvalidInputError, NotFoundError
from mmserve.sampling import GenerationDefaults, GenerationSettings, SamplingChoices, generation_settings
from mmserve.structured import grammar_of
from mmserve.wire import PixelLimits


def settings_from_body(
    body: ChatCompletionRequest | CompletionRequest, defaults: GenerationDefaults
) -> GenerationSettings:
    """The REST entry point's fields, onto the one settings builder."""
    choices = SamplingChoices(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        min_new_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        seed=None if body.seed is None else body.seed % (1 << 64),  # the wire carries uint64
        logprobs=body.num_logprobs,
        structured=body.structured,
        logit_bias=body.logit_bias_pairs,
        stop_token_ids=tuple(body.stop_token_ids or ()),
    )
    kwargs = body.mm_processor_kwargs
    pixels = None if kwargs is None else PixelLimits(kwargs.min_pixels, kwargs.max_pixels)
    return generation_settings(
        choices, defaults, max_tokens=body.token_limit, stop=body.stop_list, pixels=pixels
    )


async def check_structured(body: SamplingFields) -> None:
    """Compile the body's output constraint here, off the event loop (a large schema takes ~0.1 s), so
    that one the LLM service would refuse is a 400 naming its field before any image is fetched."""
    try:
        structured = body.structured
        if structured is None:
            return
        await asyncio.to_thread(grammar_of, structured)
    except InvalidInputError as exc:
        param = body.structured_param
        raise InvalidInputError(f"{param}: {exc}", param=param) from None


def check_model(body: SamplingFields, model_name: str) -> None:
    if body.model and body.model != model_name:
        raise NotFoundError(
            f"model: the model `{clip(body.model)}` does not exist; this server serves `{model_name}`",
            param="model",
            code="model_not_found",
        )


@dataclass(frozen=True)
class Completion:
    """One chat or text completion request, its prompt rendered."""

    route: str
    body: ChatCompletionRequest | CompletionRequest
    text: str
    urls: list[str]
    request_id: str
    render: Render
    prompt_param: str  # the request field holding the prompt, named by errors about it


async def respond(request: Request, served: Served, job: Completion) -> Response:
    """Generates `job`'s answer; a client that goes away cancels it. A stream records its own end."""
    generation = _Generation(served, job)
    outcome: str | None = "error"  # None: the stream records its own end
    try:
        await generation.start(request)
        if job.body.stream:
            response: Response = await generation.streamed(request)
            outcome = None
        else:
            response = await cancel_on_disconnect(request, generation.deadline.run(generation.whole()))
            outcome = "completed"
        return response
    except asyncio.CancelledError:
        outcome = "client_disconnected"
        raise
    finally:
        if outcome is not None:
            generation.ended(outcome)


class _Generation:
    """One completion under way: its latency counts from here, its metrics are recorded here."""

    prepared: PreparedPrompt
    deltas: AsyncGenerator[TextDelta, None]

    def __init__(self, served: Served, job: Completion):
        self.served, self.job = served, job
        self.started = time.monotonic()
        self.deadline = RequestDeadline(served.request_timeout_s)

    def ended(self, outcome: str) -> None:
        self.served.metrics.ended(self.job.route, outcome, self.started)

    def _first_token(self) -> None:
        self.served.metrics.ttft.observe(time.monotonic() - self.started)

    async def start(self, request: Request) -> None:
        """The prompt prepared (images fetched and embedded), the generation's deltas ready to come."""
        core, job = self.served.core, self.job
        settings = settings_from_body(job.body, core.defaults)
        prepare = core.prepare(
            job.text, job.urls, job.request_id, settings.pixels, prompt_param=job.prompt_param
        )
        self.prepared = await cancel_on_disconnect(request, self.deadline.run(prepare))
        self.deltas = core.generate_choices(
            self.prepared,
            settings,
            job.request_id,
            job.body.choices,
            prompt_param=job.prompt_param,
            max_tokens_param=job.body.token_limit_field,
        )

    async def streamed(self, request: Request) -> Response:
        # errors before the first token still get a status code
        first = await cancel_on_disconnect(request, self.deadline.run(anext(self.deltas)))
        self._first_token()
        body = self.job.body
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        with_ids = bool(body.return_token_ids)
        rest = self.deadline.bounded(self.deltas)
        events = self.job.render.stream(
            first, rest, self.prepared.token_ids, include_usage, with_ids, body.choices
        )
        return MeteredStream(events, self.deltas, self.ended)

    async def whole(self) -> Response:
        n = self.job.body.choices
        parts: list[list[str]] = [[] for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprob] | None] = [
            None if self.job.body.num_logprobs is None else [] for _ in range(n)
        ]
        last: list[TextDelta | None] = [None] * n
        first = True
        async for delta in self.deltas:
            if first:
                self._first_token()
                first = False
            i = delta.index
            parts[i].append(delta.text)
            ids[i].extend(delta.token_ids)
            if logprobs[i] is not None:
                logprobs[i].extend(delta.logprobs or [])  # type: ignore[union-attr]
            last[i] = delta
        finished = []
        for i in range(n):
            end = last[i]
            assert end is not None, "a generation always ends with a finishing delta"
            finished.append(FinishedChoice("".join(parts[i]), ids[i], end, logprobs[i]))
        full = self.job.render.full(finished, self.prepared.token_ids, bool(self.job.body.return_token_ids))
        return JSONResponse(full)
