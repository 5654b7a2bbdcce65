"""Turning one sequence's last-position logits into its next token."""

from __future__ import annotations

import torch

from mmserve.wire import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


# Below this temperature, sampling is argmax in all but name, and logits / T overflows.
_MIN_TEMPERATURE = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _MIN_TEMPERATURE or params.top_k == 1


def sample_next(
    logits: torch.Tensor,  # (vocab,) float32
    params: SamplingParams,
    previous: list[int],  # prompt + generated ids (for penalties)
    num_generated: int,
    eos_token_ids: list[int],
    generator: torch.Generator | None,
) -> int:
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and previous:
        seen = torch.tensor(sorted(set(previous)), device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(
            scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
        )
    if num_generated < params.min_new_tokens and not params.ignore_eos:
        logits[[t for t in eos_token_ids + params.stop_token_ids if t < logits.numel()]] = float("-inf")
    if is_greedy(params):
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if 0 < params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))  # degenerate distribution (e.g. all mass masked): be greedy
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
