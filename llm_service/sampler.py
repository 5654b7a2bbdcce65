"""Turning a batch's last-position logits into each sequence's next token (and its logprobs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from mmserve.errors import InvalidInputError
from mmserve.structured import allowed_tokens
from mmserve.wire import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from llguidance import LLMatcher

# Below this temperature, sampling is argmax in all but name, and logits / T overflows.
_MIN_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default cap)
# Each step checks every sampled token against the stop ids: their number is bounded so that one
# request cannot slow the step of every other.
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (per step, each biased row costs one indexed add)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: [-100, 100]


class SamplingRow(Protocol):
    """One sequence of the batch, as the sampler sees it (the engine's Sequence satisfies this)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Structured output: an llguidance matcher whose allowed next tokens are the only ones kept
    # (None, or no such attribute: unconstrained).
    matcher: LLMatcher | None


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _MIN_TEMPERATURE or params.top_k == 1


def validate_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Range checks done once at admission; `sample` trusts its inputs. Comparisons are written so
    that NaN fails them."""
    p = params

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise InvalidInputError(message)

    check(0 <= p.temperature < math.inf, f"temperature must be finite and >= 0, got {p.temperature}")
    check(0 <= p.top_p <= 1, f"top_p must be in [0, 1], got {p.top_p}")
    check(p.top_k >= -1, f"top_k must be -1, 0 (both off) or positive, got {p.top_k}")
    check(0 <= p.min_p <= 1, f"min_p must be in [0, 1], got {p.min_p}")
    check(
        0 < p.repetition_penalty < math.inf,
        f"repetition_penalty must be finite and > 0, got {p.repetition_penalty}",
    )
    check(-2 <= p.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {p.presence_penalty}")
    check(-2 <= p.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}")
    check(
        p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS,
        f"logprobs must be in [0, {MAX_LOGPROBS}], got {p.logprobs}",
    )
    check(p.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
    check(p.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {p.min_new_tokens}")
    check(
        len(p.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
        f"stop_token_ids has {len(p.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
    )
    bad = [t for t in p.stop_token_ids if not 0 <= t < vocab_size]
    check(not bad, f"stop_token_ids must be in [0, {vocab_size}), got {bad[:8]}")
    check(p.seed is None or 0 <= p.seed < 2**64, f"seed must be in [0, 2**64), got {p.seed}")
    check(
        len(p.logit_bias) <= MAX_LOGIT_BIAS,
        f"logit_bias has {len(p.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
    )
    bad = [t for t, _ in p.logit_bias if not 0 <= t < vocab_size]
    check(not bad, f"logit_bias token ids must be in [0, {vocab_size}), got {bad[:8]}")
    bad_bias = [b for _, b in p.logit_bias if not -LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT]
    check(not bad_bias, f"logit_bias values must be in [-100, 100], got {bad_bias[:8]}")


def _has_penalties(p: SamplingParams) -> bool:
    """Anything added to or scaled in the logits before the masks and the argmax or draw."""
    return (
        p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or bool(p.logit_bias)
    )


def _masks_eos(row: SamplingRow) -> bool:
    p = row.params
    return not p.ignore_eos and len(row.output_token_ids) < p.min_new_tokens


def _constrained(row: SamplingRow) -> bool:
    return getattr(row, "matcher", None) is not None


def _is_masked_greedy(row: SamplingRow) -> bool:
    """Greedy with nothing to apply before the argmax but a structured-output mask (if any)."""
    p = row.params
    return is_greedy(p) and p.logprobs is None and not _has_penalties(p) and not _masks_eos(row)


def _is_plain_greedy(row: SamplingRow) -> bool:
    return _is_masked_greedy(row) and not _constrained(row)


def nonfinite_rows(logits: torch.Tensor) -> list[int]:
    """Rows of (B, vocab) logits holding a NaN or an infinity: the model's output is garbage there,
    and `sample` would turn it into tokens (argmax picks a NaN; the draw falls back to argmax).

    One reduction first: a sum is finite only if every term is, and it costs ~1/20 of the per-row check
    (0.1 ms a step at batch 1, 3 ms at batch 32 over a 32k vocabulary), which runs only when the sum is
    not (finite logits whose sum overflows are found finite there)."""
    if math.isfinite(logits.sum().item()):
        return []
    bad = ~torch.isfinite(logits).all(dim=-1)  # (B,)
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


def sample(
    logits: torch.Tensor,  # (B, vocab) float32; row i belongs to rows[i]
    rows: Sequence[SamplingRow],
    eos_token_ids: Sequence[int],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Next token of every row, and its logprobs where the row asked for them (else None).

    Order per row: penalties (repetition over prompt + output, then frequency and presence over the
    output), logit_bias, min_new_tokens masking, the structured-output mask (tokens the row's matcher
    does not allow next), then greedy argmax, or temperature, min_p, top_k, top_p and a draw.
    Logprobs are of the raw distribution: log_softmax of the unprocessed logits.
    """
    if all(_is_masked_greedy(row) for row in rows):  # the hot path: one kernel, one sync
        greedy_tokens: list[int] = torch.argmax(logits, dim=-1).tolist()
        constrained = [i for i, row in enumerate(rows) if _constrained(row)]
        if constrained:  # their argmax over the tokens their grammar allows
            masks = allowed_tokens([rows[i].matcher for i in constrained], logits.shape[-1])  # type: ignore[misc]
            index = torch.tensor(constrained, device=logits.device)
            allowed = logits[index].masked_fill_(~masks.to(logits.device), float("-inf"))
            for i, token in zip(constrained, torch.argmax(allowed, dim=-1).tolist(), strict=True):
                greedy_tokens[i] = token
        return greedy_tokens, [None] * len(rows)
    logits = logits.float()  # no-op for float32; half-precision softmax and cumsum are too coarse
    processed = _penalised(logits, rows, eos_token_ids)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, row in enumerate(rows) if is_greedy(row.params)]
    drawn = [i for i, row in enumerate(rows) if not is_greedy(row.params)]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        tokens[index] = torch.argmax(processed[index], dim=-1)
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        tokens[index] = _draw(processed[index], [rows[i] for i in drawn])
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, rows, token_list)


def _penalised(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """A copy of `logits` with each row's penalties, min_new_tokens mask and structured-output mask
    applied (per row: the token histories differ in length)."""
    targets = [
        i for i, row in enumerate(rows) if _has_penalties(row.params) or _masks_eos(row) or _constrained(row)
    ]
    if not targets:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    constrained = [i for i in targets if _constrained(rows[i])]
    allowed_rows: dict[int, torch.Tensor] = {}
    if constrained:  # one (R, vocab) mask for the batch's constrained rows
        masks = allowed_tokens([rows[i].matcher for i in constrained], vocab).to(logits.device)  # type: ignore[misc]
        allowed_rows = dict(zip(constrained, masks, strict=True))
    for i in targets:
        row, p, scores = rows[i], rows[i].params, logits[i]  # scores: a (vocab,) view
        if p.repetition_penalty != 1.0:
            seen = _ids_tensor(set(row.prompt_token_ids).union(row.output_token_ids), vocab, logits.device)
            picked = scores[seen]
            scores[seen] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            counts = torch.bincount(_ids_tensor(row.output_token_ids, vocab, logits.device), minlength=vocab)
            scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias, strict=True)
            scores[torch.tensor(ids, device=logits.device)] += torch.tensor(biases, device=logits.device)
        allowed = allowed_rows.get(i)
        if _masks_eos(row):
            ends = _ids_tensor(sorted({*eos_token_ids, *p.stop_token_ids}), vocab, logits.device)
            # When the grammar allows nothing but an end, it wins over min_new_tokens.
            if allowed is None or int(allowed.sum()) > int(allowed[ends].sum()):
                scores[ends] = float("-inf")
    if constrained:
        index = torch.tensor(constrained, device=logits.device)
        logits[index] = logits[index].masked_fill(~masks, float("-inf"))
    return logits


def _ids_tensor(ids, vocab: int, device: torch.device) -> torch.Tensor:
    """Token ids as a long tensor, ids outside the vocabulary dropped."""
    return torch.tensor([t for t in ids if 0 <= t < vocab], dtype=torch.long, device=device)


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One token per row of (S, vocab) penalised logits, none of them greedy."""
    probs = _filtered_probs(logits, [row.params for row in rows])  # (S, vocab)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    seeded = [j for j, row in enumerate(rows) if row.generator is not None]
    free = [j for j, row in enumerate(rows) if row.generator is None]
    if free:
        index = torch.tensor(free, device=logits.device)
        tokens[index] = torch.multinomial(probs[index], 1).squeeze(-1)
    if seeded:
        # Each seeded row draws alone on the CPU from its own generator, so its tokens depend on
        # its seed and its logits only, never on the batch it happens to be in.
        host = probs[torch.tensor(seeded, device=logits.device)].cpu()
        drawn = [torch.multinomial(host[k], 1, generator=rows[j].generator) for k, j in enumerate(seeded)]
        tokens[torch.tensor(seeded, device=logits.device)] = torch.cat(drawn).to(logits.device)
    return tokens


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(S, vocab) logits -> probabilities after temperature, min_p, top_k and top_p (each row's own
    values; row-wise ops only, so a row's result does not depend on the others)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    scaled = logits / temperature[:, None]
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    use_top_k = any(0 < p.top_k < vocab for p in params)
    use_top_p = any(0 < p.top_p < 1 for p in params)
    if use_top_k or use_top_p:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        if use_top_k:
            k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
            kth = ordered.gather(-1, (k - 1)[:, None])  # ties with the k-th logit stay in
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        if use_top_p:
            top_p = torch.tensor([p.top_p if 0 < p.top_p < 1 else 2.0 for p in params], device=device)
            sorted_probs = torch.softmax(ordered, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
            ordered = ordered.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, ordered)
    probs = torch.softmax(scaled, dim=-1)
    # A degenerate row (everything masked, non-finite logits) falls back to its argmax.
    degenerate = ~torch.isfinite(probs).all(dim=-1, keepdim=True) | (probs.sum(dim=-1, keepdim=True) <= 0)
    fallback = torch.zeros_like(probs).scatter_(-1, torch.argmax(logits, dim=-1, keepdim=True), 1.0)
    return torch.where(degenerate, fallback, probs)


def _logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: list[int]
) -> list[TokenLogprobs | None]:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    index = torch.tensor(wanted, device=logits.device)
    raw = torch.log_softmax(logits[index].float(), dim=-1)  # (W, vocab): the model's own distribution
    chosen = raw.gather(-1, torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None])
    chosen_list = chosen.squeeze(-1).tolist()
    n_max = max(rows[i].params.logprobs or 0 for i in wanted)
    top_values: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if n_max > 0:
        values, ids = torch.topk(raw, min(n_max, raw.shape[-1]), dim=-1)  # sorted, best first
        top_values, top_ids = values.tolist(), ids.tolist()
    for k, i in enumerate(wanted):
        n = rows[i].params.logprobs or 0
        out[i] = TokenLogprobs(chosen_list[k], list(zip(top_ids[k][:n], top_values[k][:n], strict=True)))
    return out
