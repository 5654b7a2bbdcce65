"""A chat or text completion after its route: settings, generation, the response whole or streamed, and
its outcome and latency recorded once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.http.context import Served
from gateway.http.disconnect import cancel_on_disconnect
from gateway.http.errors import clip
from gateway.http.render import Render
from gateway.http.streaming import MeteredStream
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.serving import PreparedPrompt, TextDelta, TokenLogprob
from mmserve.errors import NotFoundError
from mmserve.sampling import GenerationDefaults, GenerationSettings, SamplingChoices, generation_settings
from mmserve.wire import PixelLimits


def settings_from_body(body: ChatCompletionRequest | CompletionRequest, defaults: GenerationDefaults):
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
    )
    kwargs = body.mm_processor_kwargs
    pixels = None if kwargs is None else PixelLimits(kwargs.min_pixels, kwargs.max_pixels)
    return generation_settings(
        choices, defaults, max_tokens=body.token_limit, stop=body.stop_list, pixels=pixels
    )


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
    started = time.monotonic()
    outcome: str | None = "error"  # None: the stream records its own end
    try:
        settings = settings_from_body(job.body, served.core.defaults)
        prepared, deltas = await _start(request, served, job, settings)
        if job.body.stream:
            response: Response = await _streamed(request, served, job, prepared, deltas, started)
            outcome = None
        else:
            response = await cancel_on_disconnect(request, _whole(served, job, prepared, deltas, started))
            outcome = "completed"
        return response
    except asyncio.CancelledError:
        outcome = "client_disconnected"
        raise
    finally:
        if outcome is not None:
            served.metrics.ended(job.route, outcome, started)


async def _start(
    request: Request, served: Served, job: Completion, settings: GenerationSettings
) -> tuple[PreparedPrompt, AsyncGenerator[TextDelta, None]]:
    core = served.core
    prepare = core.prepare(job.text, job.urls, job.request_id, settings.pixels, prompt_param=job.prompt_param)
    prepared = await cancel_on_disconnect(request, prepare)
    deltas = core.generate(
        prepared,
        settings,
        job.request_id,
        prompt_param=job.prompt_param,
        max_tokens_param=job.body.token_limit_field,
    )
    return prepared, deltas


async def _streamed(
    request: Request,
    served: Served,
    job: Completion,
    prepared: PreparedPrompt,
    deltas: AsyncGenerator[TextDelta, None],
    started: float,
) -> Response:
    # errors before the first token still get a status code
    first = await cancel_on_disconnect(request, anext(deltas))
    served.metrics.ttft.observe(time.monotonic() - started)
    body = job.body
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = job.render.stream(first, deltas, prepared.token_ids, include_usage, bool(body.return_token_ids))
    return MeteredStream(events, deltas, lambda ended: served.metrics.ended(job.route, ended, started))


async def _whole(
    served: Served,
    job: Completion,
    prepared: PreparedPrompt,
    deltas: AsyncGenerator[TextDelta, None],
    started: float,
) -> Response:
    parts: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None if job.body.num_logprobs is None else []
    last: TextDelta | None = None
    async for delta in deltas:
        if not ids:
            served.metrics.ttft.observe(time.monotonic() - started)
        parts.append(delta.text)
        ids.extend(delta.token_ids)
        if logprobs is not None:
            logprobs.extend(delta.logprobs or [])
        last = delta
    assert last is not None, "a generation always ends with a finishing delta"
    with_ids = bool(job.body.return_token_ids)
    full = job.render.full("".join(parts), ids, last, prepared.token_ids, with_ids, logprobs)
    return JSONResponse(full)
