"""The gateway's serving core, shared by the HTTP API and the in-process Pipeline.

prompt text + image urls -> fetch -> vision Embed -> tokenize + expand image tags -> LLM Generate
-> incremental detokenization + stop strings -> text deltas (with the logprobs of their tokens).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace

from gateway.chat_input import SpecialTokenGuard
from gateway.detokenizer import HeldTokens, IncrementalDetokenizer, StopStrings
from gateway.drain import Drain
from gateway.media import MediaError, MediaFetcher
from gateway.prompts import expand_image_tokens
from mmserve.errors import InvalidInputError, UnavailableError
from mmserve.images import content_hash, probe_image
from mmserve.interfaces import PromptAdapter
from mmserve.sampling import GenerationDefaults, GenerationSettings
from mmserve.wire import (
    GenerateOutput,
    GenerateRequest,
    ImageInput,
    ImageSpan,
    LLMInfo,
    PixelLimits,
    TokenLogprobs,
    Usage,
)


@dataclass
class PreparedPrompt:
    token_ids: list[int]  # image placeholders expanded
    images: list[ImageSpan]


@dataclass
class TokenLogprob:
    """One generated token's logprob and its step's top alternatives, as token strings."""

    token: str  # the tokenizer's decode of this token alone (special tokens kept)
    logprob: float
    top: list[tuple[str, float]]  # (token, logprob), best first
    text_offset: int  # where the token's text starts in the completion text


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    usage: Usage | None = None  # on the last delta
    # Logprobs of the tokens whose text this delta carries (not of `token_ids`: text is held back at
    # partial characters and possible stop strings); None when the request asked for none.
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice it belongs to (a request's `n` choices: ServingCore.generate_choices)


# The bound on UTF-8 bytes per token behind the check before tokenizing: the longest token of the served
# vocabularies is 128 bytes (Qwen's, from cl100k: a run of 128 spaces; Llama's and Mistral's
# SentencePiece tokens are far shorter), so a prompt over max_model_len * 128 bytes cannot fit.
MAX_BYTES_PER_TOKEN = 128


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ServingCore:
    def __init__(
        self,
        prompt: PromptAdapter,
        vision_client,
        llm_client,
        fetcher: MediaFetcher,
        max_images_per_request: int,
        defaults: GenerationDefaults | None = None,
    ):
        self.prompt = prompt
        self.defaults = defaults or GenerationDefaults()  # the checkpoint's generation_config.json
        self.drain = Drain()
        self.tokenizer = prompt.tokenizer
        self.vision = vision_client
        self.llm = llm_client
        self.fetcher = fetcher
        self.max_images = max_images_per_request
        self._llm_info: LLMInfo | None = None
        self._guard = SpecialTokenGuard(self.tokenizer)
        self._token_strings: dict[int, str] = {}  # token id -> its decode alone (logprobs)

    async def llm_info(self) -> LLMInfo:
        if self._llm_info is None:
            info = await self.llm.model_info()
            if info.image_token_id != self.prompt.image_token_id:
                raise UnavailableError(
                    f"the gateway's tokenizer puts images at token id {self.prompt.image_token_id} but the LLM "
                    f"service expects {info.image_token_id}: serve both from the same checkpoint and tokenizer"
                )
            self._llm_info = info
        return self._llm_info

    # ---- prompts ---------------------------------------------------------------------------------

    def chat_prompt(
        self, messages: list[dict], chat_template_kwargs: dict | None = None
    ) -> tuple[str, list[str]]:
        """OpenAI chat messages -> (rendered prompt, image urls in prompt order). The user's text is
        checked here, before the prompt adapter renders it (for a "string" chat template the adapter also
        writes each image's placeholder text into the message: that text is ours, not the user's)."""
        converted, urls = self._guard.template_messages(messages)
        if chat_template_kwargs:
            self._guard.check_template_kwargs(chat_template_kwargs)
            return self.prompt.render_chat(converted, chat_template_kwargs=chat_template_kwargs), urls
        return self.prompt.render_chat(converted), urls

    async def prepare(
        self,
        text: str,
        urls: list[str],
        request_id: str,
        pixels: PixelLimits | None = None,
        *,
        prompt_param: str = "prompt",
    ) -> PreparedPrompt:
        """`prompt_param`: the request field the prompt came from, named by errors about its size."""
        # families whose prompts carry urls inline (Qwen-VL's <img>URL</img>) take them out here
        text, urls = self.prompt.extract_images(text, list(urls))
        await self._check_prompt_bytes(text, prompt_param)
        token_ids = await asyncio.to_thread(self.prompt.tokenize, text)
        tags = sum(1 for t in token_ids if t == self.prompt.image_token_id)
        if tags != len(urls):
            raise InvalidInputError(
                f"the prompt has {tags} image tag{'s' * (tags != 1)} ({self.prompt.image_tag}) "
                f"but {len(urls)} image{' was' if len(urls) == 1 else 's were'} given"
            )
        if len(urls) > self.max_images:
            raise InvalidInputError(f"{len(urls)} images in one request, over the limit of {self.max_images}")
        if not urls:
            return PreparedPrompt(token_ids, [])
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the other fetches
                tasks = [group.create_task(self._load_image(i, url)) for i, url in enumerate(urls)]
        except* InvalidInputError as failures:
            raise failures.exceptions[0] from None
        images = [task.result() for task in tasks]
        features = await self.vision.embed(images, request_id, pixels)
        token_ids, spans = expand_image_tokens(token_ids, self.prompt.image_token_id, features)
        return PreparedPrompt(token_ids, spans)

    async def _check_prompt_bytes(self, text: str, param: str) -> None:
        """The cheap bound before tokenizing (which takes seconds per megabyte): a prompt of more than
        max_model_len * MAX_BYTES_PER_TOKEN UTF-8 bytes cannot tokenize to max_model_len tokens or fewer,
        so it is refused without being tokenized. Text that cannot be encoded is refused as well."""
        limit = (await self.llm_info()).max_model_len * MAX_BYTES_PER_TOKEN
        try:
            size = len(text) if len(text) > limit else len(text.encode("utf-8"))  # a character is >= 1 byte
        except UnicodeEncodeError as exc:
            raise InvalidInputError(
                f"{param}: is not valid UTF-8 text (a lone surrogate at character {exc.start})", param=param
            ) from None
        if size > limit:
            raise InvalidInputError(
                f"{param}: the prompt is over {limit} bytes, more than this model's maximum context length "
                f"of {limit // MAX_BYTES_PER_TOKEN} tokens can hold (at most {MAX_BYTES_PER_TOKEN} bytes a token)",
                param=param,
                code="context_length_exceeded",
            )

    async def _load_image(self, index: int, url: str) -> ImageInput:
        try:
            data = await self.fetcher.fetch(url)
            return await asyncio.to_thread(self._checked_input, data)
        except InvalidInputError as exc:
            raise MediaError(f"image {index}: {exc}") from None

    def _checked_input(self, data: bytes) -> ImageInput:
        probe_image(data, self.fetcher.config.max_image_pixels, what="image")
        return ImageInput(data=data, content_hash=content_hash(data))

    # ---- generation --------------------------------------------------------------------------------

    async def generate(
        self,
        prepared: PreparedPrompt,
        settings: GenerationSettings,
        request_id: str,
        *,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
    ) -> AsyncGenerator[TextDelta, None]:
        """`prompt_param`, `max_tokens_param`: the request fields a context-length error names (the prompt's
        when the prompt leaves no room for a token, else the token limit's)."""
        max_tokens = await self._token_budget(prepared, settings, prompt_param, max_tokens_param)
        sampling = replace(settings.sampling, max_new_tokens=max_tokens)
        request = GenerateRequest(request_id, prepared.token_ids, prepared.images, sampling)
        prompt_len = len(prepared.token_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopStrings(settings.stop)
        held: HeldTokens[TokenLogprob] | None = HeldTokens() if sampling.logprobs is not None else None
        cached = 0
        async with aclosing(self.llm.generate(request)) as outputs:
            async for output in outputs:
                if self.drain.expired:  # leaving the block cancels the rest of the generation
                    raise UnavailableError(
                        "the server is shutting down: this generation did not finish within the drain period"
                    )
                text = self._push(output, detokenizer, stops, held)
                finish = output.finish_reason.value if output.finish_reason else None
                if output.usage is not None:
                    cached = output.usage.cached_tokens
                if stops.stopped:
                    finish = "stop"  # closing `outputs` cancels the rest of the generation
                elif finish is not None:
                    text += stops.feed(detokenizer.finish())
                    text += stops.flush()
                    finish = "stop" if stops.stopped else finish
                logprobs = None
                if held is not None:
                    logprobs = held.release(stops.released, stops.stopped, final=finish is not None)
                if finish is None:
                    if text or output.token_ids:
                        yield TextDelta(text, output.token_ids, logprobs=logprobs)
                    continue
                usage = Usage(prompt_len, len(detokenizer.ids), cached)
                yield TextDelta(text, output.token_ids, finish, usage, logprobs)
                return
        raise UnavailableError("the llm stream ended without a finish reason")

    def generate_choices(
        self,
        prepared: PreparedPrompt,
        settings: GenerationSettings,
        request_id: str,
        n: int,
        *,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
    ) -> AsyncGenerator[TextDelta, None]:
        """`n` choices of one prompt, generated side by side as `n` LLM requests (`request_id`-0,
        -1, ...), their deltas interleaved as they come, each with its choice's `index`. The LLM service
        computes the shared prompt once: a sequence whose next prompt block another is computing waits
        for it and takes it from the prefix cache. With a seed, choice i draws with seed + i (vLLM's
        rule), so the choices differ and each is reproducible. The first error ends them all; closing
        the generator cancels every choice still running. n == 1 is `generate` itself."""
        names = dict(prompt_param=prompt_param, max_tokens_param=max_tokens_param)
        if n == 1:
            return self.generate(prepared, settings, request_id, **names)
        seed = settings.sampling.seed
        return interleave(
            [
                self.generate(
                    prepared,
                    settings
                    if seed is None
                    else replace(settings, sampling=replace(settings.sampling, seed=(seed + i) % (1 << 64))),
                    f"{request_id}-{i}",
                    **names,
                )
                for i in range(n)
            ]
        )

    async def _token_budget(
        self, prepared: PreparedPrompt, settings: GenerationSettings, prompt_param: str, max_tokens_param: str
    ) -> int:
        """The completion's token limit: the request's, else the checkpoint's max_new_tokens when it has
        one, else the room the prompt leaves in the context; refused when it does not fit."""
        info = await self.llm_info()
        prompt_len = len(prepared.token_ids)
        room = info.max_model_len - prompt_len
        max_tokens = settings.max_tokens
        if max_tokens is None:
            max_tokens = min(room, self.defaults.max_tokens or room)
        if room < 1 or max_tokens > room:
            param = prompt_param if room < 1 else max_tokens_param
            raise InvalidInputError(
                f"{param}: this model's maximum context length is {info.max_model_len} tokens; the prompt has "
                f"{prompt_len} and {max_tokens} completion tokens were requested",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def _push(
        self,
        output: GenerateOutput,
        detokenizer: IncrementalDetokenizer,
        stops: StopStrings,
        held: HeldTokens[TokenLogprob] | None,
    ) -> str:
        """Detokenize one LLM message token by token (so that each token's text span is known for
        its logprobs); returns the text that passed the stop strings."""
        if held is None or not output.logprobs:
            return stops.feed(detokenizer.push(output.token_ids))
        text = ""
        for k, token_id in enumerate(output.token_ids):
            start = len(detokenizer.emitted)
            text += stops.feed(detokenizer.push([token_id]))
            if k < len(output.logprobs):  # one per token, by contract
                held.add(
                    start, len(detokenizer.emitted), self._token_logprob(token_id, output.logprobs[k], start)
                )
        return text

    def _token_logprob(self, token_id: int, logprobs: TokenLogprobs, text_offset: int) -> TokenLogprob:
        top = [(self.token_string(t), value) for t, value in logprobs.top]
        return TokenLogprob(self.token_string(token_id), logprobs.logprob, top, text_offset)

    def token_string(self, token_id: int) -> str:
        """A token's text alone, as logprobs report it (vLLM's choice: one-token decode, special tokens
        kept; a byte-level token that ends mid-character decodes to U+FFFD)."""
        text = self._token_strings.get(token_id)
        if text is None:
            text = self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            self._token_strings[token_id] = text
        return text


async def interleave(generations: list[AsyncGenerator[TextDelta, None]]) -> AsyncGenerator[TextDelta, None]:
    """The deltas of several generations as each comes, tagged with the generation's index. A
    generation's error is raised here (the others are then closed); so is closing this generator."""
    queue: asyncio.Queue[tuple[TextDelta | None, BaseException | None]] = asyncio.Queue(len(generations))

    async def pump(index: int, generation: AsyncGenerator[TextDelta, None]) -> None:
        try:
            async with aclosing(generation):
                async for delta in generation:
                    await queue.put((replace(delta, index=index), None))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this generator is being closed
            # the generation's own call was cancelled (a gRPC channel closing under it): its end must still
            # reach the consumer, or the response would wait for the choice until its deadline
            await queue.put((None, UnavailableError(f"choice {index}'s generation was cancelled")))
            return
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((None, exc))
            return
        await queue.put((None, None))  # this one is done

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                running -= 1
            else:
                yield delta
    finally:
        for task in tasks:
            task.cancel()  # a pump's cancellation closes its generation (which cancels it in the LLM)
        await asyncio.gather(*tasks, return_exceptions=True)
