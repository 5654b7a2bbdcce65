"""The in-process Python API, in rtp-llm's shape:

    model = ModelFactory.from_huggingface("/path/to/checkpoint")
    pipeline = Pipeline(model, model.tokenizer)
    for res in pipeline("USER: <image>\\nWhat is this? ASSISTANT:", urls=[url], generate_config={"top_k": 1}):
        print(res.batch_response)
    pipeline.stop()

It runs the gateway's ServingCore with in-process clients of the vision encoder and the LLM engine
instead of gRPC ones: the same code path, one process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.clients import InProcessLLMClient, InProcessVisionClient
from gateway.config import MediaConfig
from gateway.generation_defaults import GenerationDefaults
from gateway.media import MediaFetcher
from gateway.serving import GenerationSettings, ServingCore, new_request_id
from mmserve.families import adapter, detect_family
from mmserve.wire import PixelLimits, SamplingParams, Usage

if TYPE_CHECKING:
    from gateway.prompts import LlavaPrompt
    from llm_service.engine import Engine
    from vision_service.encoder import VisionEncoder


@dataclass
class MultimodalModel:
    """Both halves of a checkpoint plus its prompt adapter, loaded in this process."""

    checkpoint: str
    family: str
    prompt: LlavaPrompt
    vision: VisionEncoder
    engine: Engine

    @property
    def tokenizer(self):
        return self.prompt.tokenizer

    def stop(self) -> None:
        self.engine.stop()
        self.vision.close()


class ModelFactory:
    @staticmethod
    def from_huggingface(
        name_or_path: str,
        model_type: str | None = None,
        tokenizer_path: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
    ) -> MultimodalModel:
        """Load a local checkpoint folder (or a hub id, where a network exists); dtype "auto" is the
        checkpoint's own (float16 becomes bfloat16 on CPU)."""
        from llm_service.config import LLMConfig
        from llm_service.engine import Engine
        from llm_service.models import load_language_model
        from vision_service.config import VisionConfig
        from vision_service.encoder import VisionEncoder

        path = name_or_path
        if not Path(path).is_dir():
            from huggingface_hub import snapshot_download

            path = snapshot_download(name_or_path)
        family = detect_family(path, model_type)
        prompt = adapter(family, "prompt")(path, tokenizer_path or path)
        vision = VisionEncoder(
            VisionConfig(checkpoint=path, model_type=model_type, dtype=dtype, device=device)
        )
        llm_config = LLMConfig(checkpoint=path, model_type=model_type, dtype=dtype, device=device)
        engine = Engine(load_language_model(llm_config), llm_config.engine_config())
        return MultimodalModel(path, family, prompt, vision, engine)


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


# generate_config keys (rtp-llm's names) -> how they apply.
_CONFIG_KEYS = {
    "max_new_tokens",
    "min_new_tokens",
    "top_k",
    "top_p",
    "temperature",
    "repetition_penalty",
    "random_seed",
    "seed",
    "ignore_eos",
    "stop_words_str",
    "stop_words_list",
    # image resize bounds of this call (Qwen2-VL family), also accepted nested as vLLM's mm_processor_kwargs
    "min_pixels",
    "max_pixels",
    "mm_processor_kwargs",
}


def settings_from_generate_config(
    config: dict | None, defaults: GenerationDefaults | None = None
) -> GenerationSettings:
    """rtp-llm's generate_config; keys it leaves unset come from the checkpoint's generation_config.json."""
    config = dict(config or {})
    defaults = defaults or GenerationDefaults()
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown generate_config keys {unknown}; supported: {sorted(_CONFIG_KEYS)}")
    stop_ids = []
    for words in config.get("stop_words_list", []):
        if len(words) != 1:
            raise ValueError("stop_words_list entries must be single token ids, e.g. [[151645]]")
        stop_ids.append(int(words[0]))
    sampling = SamplingParams(
        temperature=float(config.get("temperature", defaults.temperature)),
        top_p=float(config.get("top_p", defaults.top_p)),
        top_k=int(config.get("top_k", defaults.top_k)),
        min_p=defaults.min_p,
        min_new_tokens=int(config.get("min_new_tokens", 0)),
        ignore_eos=bool(config.get("ignore_eos", False)),
        stop_token_ids=stop_ids,
        seed=config.get("random_seed", config.get("seed")),
        repetition_penalty=float(config.get("repetition_penalty", defaults.repetition_penalty)),
    )
    pixel_config = {**config, **dict(config.get("mm_processor_kwargs") or {})}
    unknown = sorted(set(config.get("mm_processor_kwargs") or {}) - {"min_pixels", "max_pixels"})
    if unknown:
        raise ValueError(
            f"unknown mm_processor_kwargs keys {unknown}; supported: ['max_pixels', 'min_pixels']"
        )
    pixels = PixelLimits(
        *(
            int(pixel_config[k]) if pixel_config.get(k) is not None else None
            for k in ("min_pixels", "max_pixels")
        )
    )
    return GenerationSettings(
        sampling,
        int(config.get("max_new_tokens", defaults.max_tokens or 256)),
        list(config.get("stop_words_str", [])),
        pixels if pixels else None,
    )


class Pipeline:
    def __init__(self, model: MultimodalModel, tokenizer=None, media: MediaConfig | None = None):
        """`media` sets the image-fetching policy; by default local files and private hosts are allowed,
        since the caller is the process owner (the HTTP gateway's defaults are strict)."""
        self.model = model
        self.tokenizer = tokenizer or model.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pipeline-loop", daemon=True)
        self._thread.start()
        media = media or MediaConfig(allow_private_urls=True, allowed_local_media_path="/")

        async def build():
            return ServingCore(
                model.prompt,
                InProcessVisionClient(model.vision),
                InProcessLLMClient(model.engine),
                MediaFetcher(media),
                max_images_per_request=64,
                defaults=GenerationDefaults.from_checkpoint(model.checkpoint),
            )

        self.core = asyncio.run_coroutine_threadsafe(build(), self._loop).result()

    def __call__(
        self, prompt: str | list[str], urls: list | None = None, generate_config: dict | None = None
    ) -> Iterator[PipelineResponse]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(prompt, str):
            url_lists = [list(urls or [])]
        else:
            url_lists = [list(u or []) for u in urls] if urls is not None else [[] for _ in prompts]
            if len(url_lists) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(url_lists)} url lists")
        settings = settings_from_generate_config(generate_config, self.core.defaults)
        return self._stream(prompts, url_lists, settings)

    def _stream(self, prompts, url_lists, settings) -> Iterator[PipelineResponse]:
        events: queue.Queue = queue.Queue()
        texts = [""] * len(prompts)
        ids: list[list[int]] = [[] for _ in prompts]
        done, usage = [False] * len(prompts), [None] * len(prompts)

        async def one(index: int):
            try:
                text = self.core.prompt.normalize_raw(prompts[index])
                request_id = new_request_id("pipeline")
                prepared = await self.core.prepare(text, url_lists[index], request_id, settings.pixels)
                sampling = SamplingParams(**vars(settings.sampling))
                own = GenerationSettings(sampling, settings.max_tokens, settings.stop, settings.pixels)
                async for delta in self.core.generate(prepared, own, request_id):
                    events.put((index, delta))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                events.put((index, exc))

        futures = [asyncio.run_coroutine_threadsafe(one(i), self._loop) for i in range(len(prompts))]
        try:
            while not all(done):
                index, item = events.get()
                if isinstance(item, BaseException):
                    raise item
                texts[index] += item.text
                ids[index] += item.token_ids
                if item.finish_reason is not None:
                    done[index], usage[index] = True, item.usage
                yield PipelineResponse(list(texts), list(done), [list(i) for i in ids], list(usage))
        finally:
            for future in futures:
                future.cancel()

    def stop(self) -> None:
        """Stop the engine and the event loop; the pipeline cannot be used afterwards."""
        asyncio.run_coroutine_threadsafe(self.core.fetcher.aclose(), self._loop).result(timeout=5)
        self.model.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
