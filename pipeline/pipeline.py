"""The Pipeline: the gateway's ServingCore over in-process vision and LLM clients, as a sync iterator."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.clients import InProcessLLMClient, InProcessVisionClient
from gateway.config import MediaConfig
from gateway.media import MediaFetcher
from gateway.serving import ServingCore, TextDelta, new_request_id
from mmserve.sampling import GenerationDefaults, GenerationSettings
from mmserve.wire import Usage
from pipeline.factory import MultimodalModel
from pipeline.settings import return_sequences, settings_from_generate_config


@dataclass
class PipelineResponse:
    """One streamed step: the text so far of every prompt in the call."""

    batch_response: list[str]
    finished: list[bool]
    token_ids: list[list[int]] = field(default_factory=list)
    usage: list[Usage | None] = field(default_factory=list)

    @property
    def response(self) -> str:
        return self.batch_response[0]


def _url_lists(prompt: str | list[str], urls: list | None) -> list[list]:
    """One url list per prompt: `urls` is the list of a single prompt, or one list per prompt."""
    if isinstance(prompt, str):
        return [list(urls or [])]
    if urls is None:
        return [[] for _ in prompt]
    url_lists = [list(u or []) for u in urls]
    if len(url_lists) != len(prompt):
        raise ValueError(f"{len(prompt)} prompts but {len(url_lists)} url lists")
    return url_lists


class _Progress:
    """The text, token ids and usage so far of every prompt of one call."""

    def __init__(self, count: int):
        self.texts = [""] * count
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.done = [False] * count
        self.usage: list[Usage | None] = [None] * count

    def add(self, index: int, delta: TextDelta) -> PipelineResponse:
        self.texts[index] += delta.text
        self.ids[index] += delta.token_ids
        if delta.finish_reason is not None:
            self.done[index], self.usage[index] = True, delta.usage
        return PipelineResponse(
            list(self.texts), list(self.done), [list(i) for i in self.ids], list(self.usage)
        )


class Pipeline:
    """The same code path as the HTTP gateway (ServingCore), with the vision encoder and the LLM engine
    called in this process instead of over gRPC; the caller iterates synchronously."""

    def __init__(self, model: MultimodalModel, tokenizer=None, media: MediaConfig | None = None):
        """`media` sets the image-fetching policy; by default local files and private hosts are allowed,
        since the caller is the process owner (the HTTP gateway's defaults are strict)."""
        self.model = model
        self.tokenizer = tokenizer or model.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pipeline-loop", daemon=True)
        self._thread.start()
        media = media or MediaConfig(allow_private_urls=True, allowed_local_media_path="/")
        self.core = asyncio.run_coroutine_threadsafe(self._build_core(media), self._loop).result()

    async def _build_core(self, media: MediaConfig) -> ServingCore:
        """Built inside the pipeline's loop, where the fetcher's HTTP client must live."""
        return ServingCore(
            self.model.prompt,
            InProcessVisionClient(self.model.vision),
            InProcessLLMClient(self.model.engine),
            MediaFetcher(media),
            max_images_per_request=64,
            defaults=GenerationDefaults.from_checkpoint(self.model.checkpoint),
        )

    def __call__(
        self, prompt: str | list[str], urls: list | None = None, generate_config: dict | None = None
    ) -> Iterator[PipelineResponse]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        url_lists = _url_lists(prompt, urls)
        settings = settings_from_generate_config(generate_config, self.core.defaults)
        return self._stream(prompts, url_lists, settings, return_sequences(generate_config))

    async def _generate(self, prompt: str, urls: list, settings: GenerationSettings, n: int, report) -> None:
        """One prompt's deltas (of its `n` choices, each with its `index`), each handed to `report`; a
        failure is handed over too."""
        try:
            text = self.core.prompt.normalize_raw(prompt)
            request_id = new_request_id("pipeline")
            prepared = await self.core.prepare(text, urls, request_id, settings.pixels)
            async for delta in self.core.generate_choices(prepared, settings, request_id, n):
                report(delta)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            report(exc)

    def _stream(self, prompts, url_lists, settings: GenerationSettings, n: int) -> Iterator[PipelineResponse]:
        events: queue.Queue = queue.Queue()
        progress = _Progress(len(prompts) * n)  # prompt i's choice j is entry i * n + j
        futures = [
            asyncio.run_coroutine_threadsafe(
                self._generate(p, u, settings, n, lambda item, i=i: events.put((i, item))), self._loop
            )
            for i, (p, u) in enumerate(zip(prompts, url_lists, strict=True))
        ]
        try:
            while not all(progress.done):
                index, item = events.get()
                if isinstance(item, BaseException):
                    raise item
                yield progress.add(index * n + item.index, item)
        finally:
            for future in futures:
                future.cancel()

    def stop(self) -> None:
        """Stop the engine and the event loop; the pipeline cannot be used afterwards."""
        asyncio.run_coroutine_threadsafe(self.core.fetcher.aclose(), self._loop).result(timeout=5)
        self.model.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
