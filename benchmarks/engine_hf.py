"""The engine benchmark's baselines: transformers' LLaVA `generate`, one request at a time and as one
static batch, timed from the JPEG bytes with a streamer that timestamps every token."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from benchmarks.engine_measure import WARMUP_SEED, RequestTiming, RunResult, Workload


class StepClock:
    """A `generate` streamer that timestamps every `put`: the first put is the prompt, every later
    one is one decoding step (one token per sequence; a [batch] tensor in a batched generate)."""

    def __init__(self):
        self.times: list[float] = []
        self.steps: list[list[int]] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        self.steps.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

    @property
    def token_times(self) -> list[float]:
        return self.times[1:]


class HFBaseline:
    def __init__(self, checkpoint: Path, dtype: str):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.model = LlavaForConditionalGeneration.from_pretrained(
            checkpoint, dtype=getattr(torch, dtype)
        ).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.processor.tokenizer.padding_side = "left"

    def prompt(self, text: str) -> str:
        """The same user message the openai client sends (image first, then text), through the
        checkpoint's chat template, as the gateway renders it."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, images: list[bytes], texts: list[str], max_tokens: int, clock: StepClock | None):
        from PIL import Image

        pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = self.processor(
            images=pil, text=[self.prompt(t) for t in texts], padding=True, return_tensors="pt"
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with self.torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,  # EOS is masked until then: exactly max_tokens tokens
                do_sample=False,
                streamer=clock,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        return inputs["attention_mask"].sum(dim=1).tolist()

    def warm_up(self) -> None:
        extra = Workload.make(2, WARMUP_SEED)
        self.generate(extra.images[:1], extra.texts[:1], 4, None)
        self.generate(extra.images, extra.texts, 4, None)

    def sequential(self, work: Workload, max_tokens: int) -> RunResult:
        runs = []
        for image, text in zip(work.images, work.texts, strict=True):
            clock = StepClock()
            timing = RequestTiming(sent=time.perf_counter())
            (timing.prompt_tokens,) = self.generate([image], [text], max_tokens, clock)
            timing.finished = time.perf_counter()
            timing.token_times = clock.token_times
            timing.token_ids = [step[0] for step in clock.steps[1:]]
            timing.completion_tokens = len(timing.token_times)
            runs.append(timing)
        return RunResult("HF sequential", runs, sum(r.finished - r.sent for r in runs))

    def static_batch(self, work: Workload, max_tokens: int) -> RunResult:
        clock = StepClock()
        sent = time.perf_counter()
        prompt_tokens = self.generate(work.images, work.texts, max_tokens, clock)
        finished = time.perf_counter()
        runs = []
        for i, n in enumerate(prompt_tokens):
            timing = RequestTiming(sent, list(clock.token_times), finished, len(clock.token_times), n)
            timing.token_ids = [step[i] for step in clock.steps[1:]]
            runs.append(timing)
        return RunResult(f"HF static batch {len(work.images)}", runs, finished - sent)
