"""The correctness reference: transformers' own LlavaForConditionalGeneration on the same checkpoint."""

from __future__ import annotations

import io

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


class LlavaReference:
    def __init__(self, checkpoint):
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def chat_prompt(self, text: str, num_images: int) -> str:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    @torch.inference_mode()
    def greedy(self, prompt: str, images: list[bytes], max_new_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids, new ids) of greedy `generate` on the HF processor's inputs."""
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        inputs = self.processor(text=prompt, images=pil or None, return_tensors="pt")
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        prompt_ids = inputs["input_ids"][0].tolist()
        return prompt_ids, out[0, len(prompt_ids) :].tolist()


def greedy_with_logprobs(model, inputs: dict, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """New ids of greedy `generate` on one request, and its (steps, vocab) float32 log-probabilities."""
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = inputs["input_ids"].shape[1]
    logprobs = torch.log_softmax(torch.stack([step[0] for step in out.logits]).float(), dim=-1)
    return out.sequences[0, prompt_len:].tolist(), logprobs


NEAR_TIE = 1e-3  # logprob gap under which a batched float32 sum may flip the argmax


def assert_greedy_close(ours: list[int], reference: list[int], logprobs: torch.Tensor, what: str) -> None:
    """Token-identical greedy output, except that at the first divergence (if any) our token may be
    one the reference scored within NEAR_TIE of its own choice; past it the texts are different
    continuations and are not compared (the check vLLM's tests use)."""
    for step, (mine, theirs) in enumerate(zip(ours, reference, strict=False)):
        if mine == theirs:
            continue
        gap = float(logprobs[step, theirs] - logprobs[step, mine])
        assert gap <= NEAR_TIE, (
            f"{what}: step {step} gave {mine}, the reference {theirs}; the reference scored them "
            f"{gap:.3g} apart in logprob, not a near-tie (ours {ours}, reference {reference})"
        )
        return
    assert len(ours) == len(reference), f"{what}: {len(ours)} tokens, the reference {len(reference)}"


def qwen_vl_reference_lm(checkpoint) -> torch.nn.Module:
    """Qwen-VL v1's language model as transformers' own Qwen2ForCausalLM (weights mapped as
    llm_service/models/qwen_vl.py maps them; the mapping itself is checked against Qwen v1's math in
    tests/service/test_qwen_vl_halves.py)."""
    from transformers import Qwen2ForCausalLM

    from llm_service.models.qwen_vl import map_weights, qwen2_config
    from mmserve.checkpoint import load_weights, read_config

    config = qwen2_config(read_config(checkpoint))
    prefixes = {"transformer.h.": "h.", "transformer.wte.": "wte.", "transformer.ln_f.": "ln_f."}
    state = map_weights(
        load_weights(checkpoint, {**prefixes, "lm_head.": "lm_head."}), config.num_hidden_layers
    )
    model = Qwen2ForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def decoder_logits(language_model, embeds: torch.Tensor) -> torch.Tensor:
    """(T, vocab) float32 logits of every position of `embeds` (T, hidden) through our decoder alone,
    as one prefill over a fresh KV cache (one slot per block)."""
    from llm_service.attention import LayerCache, PrefillChunk, SdpaAttention
    from llm_service.attention import SdpaMetadata as AttentionMetadata

    decoder, length = language_model.decoder, embeds.shape[0]
    config = decoder.config
    attend = SdpaAttention()
    shape = attend.cache_shape(length, 1, config.num_kv_heads, config.head_dim)
    caches = [LayerCache(embeds.new_zeros(shape), embeds.new_zeros(shape)) for _ in range(config.num_layers)]
    meta = AttentionMetadata(torch.arange(length), prefills=[PrefillChunk(0, length)])
    with torch.inference_mode():
        return decoder.logits(decoder(embeds, torch.arange(length), caches, meta, attend))


def engine_greedy(language_model, request) -> list[int]:
    """Our engine's greedy tokens for one GenerateRequest."""
    import asyncio

    from llm_service.engine import Engine

    async def run(engine):
        return [t async for out in engine.generate(request) for t in out.token_ids]

    engine = Engine(language_model)
    try:
        return asyncio.run(run(engine))
    finally:
        engine.stop()
