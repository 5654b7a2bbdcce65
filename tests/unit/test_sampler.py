import dataclasses
import math
from dataclasses import dataclass, field

import pytest
import torch

from llm_service.sampler import is_greedy, make_generator, sample, validate_sampling
from mmserve.errors import InvalidInputError
from mmserve.wire import SamplingParams

EOS = 2


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


def row(prompt=(), output=(), **params) -> Row:
    p = SamplingParams(**params)
    return Row(p, make_generator(p), list(prompt), list(output))


def one(logits, r: Row, eos=(EOS,)) -> int:
    tokens, _ = sample(logits[None], [r], eos)
    return tokens[0]


def draws(logits, n=200, **params) -> set[int]:
    r = row(seed=0, **params)
    return {one(logits, r) for _ in range(n)}


# ---- each knob ---------------------------------------------------------------------------------


def test_logit_bias_is_added_before_the_argmax_and_the_draw():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert one(logits, row(temperature=0, logit_bias=((1, -100.0),))) == 2  # the top token banned
    assert one(logits, row(temperature=0, logit_bias=((3, 4.5),))) == 3  # -1 + 4.5 beats 3
    assert one(logits, row(temperature=0, logit_bias=((3, 3.5),))) == 1  # -1 + 3.5 does not
    assert draws(logits, temperature=1.0, logit_bias=((0, 100.0),)) == {0}
    assert 1 not in draws(logits, temperature=1.0, logit_bias=((1, -100.0),))
    # logprobs stay those of the raw logits
    tokens, logprobs = sample(
        logits[None], [row(temperature=0, logprobs=1, logit_bias=((1, -100.0),))], (EOS,)
    )
    assert tokens == [2] and logprobs[0].top[0][0] == 1


def test_greedy_by_temperature_zero_or_top_k_one():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert one(logits, row(temperature=0)) == 1
    assert one(logits, row(temperature=1.0, top_k=1)) == 1
    assert is_greedy(SamplingParams(temperature=1e-6)) and not is_greedy(SamplingParams())


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.9, 4.8, 0.0, 0.0, 0.0])
    assert draws(logits, top_k=2) == {0, 1}
    assert draws(logits, top_k=3) == {0, 1, 2}
    # The first three tokens hold ~98% of the mass; top_p=0.5 keeps the first two only.
    assert draws(logits, top_p=0.5) == {0, 1}
    assert draws(logits, top_p=0.01) == {0}
    assert draws(torch.zeros(6), top_k=-1, top_p=1.0) == set(range(6))  # both off


def test_top_k_keeps_ties_with_the_kth_logit():
    assert draws(torch.tensor([3.0, 2.0, 2.0, -5.0]), top_k=2) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    # probabilities ∝ e^0, e^-1, e^-2, e^-3: relative to the top, 1, 0.37, 0.14, 0.05
    logits = torch.tensor([0.0, -1.0, -2.0, -3.0])
    assert draws(logits, min_p=0.3) == {0, 1}
    assert draws(logits, min_p=0.1) == {0, 1, 2}
    # min_p applies after temperature: at T=0.5 the ratios square (0.14, 0.02, ...)
    assert draws(logits, min_p=0.1, temperature=0.5) == {0, 1}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 0.0])
    hot, cold = row(seed=1, temperature=5.0), row(seed=1, temperature=0.1)
    share_hot = sum(one(logits, hot) == 0 for _ in range(400)) / 400
    share_cold = sum(one(logits, cold) == 0 for _ in range(400)) / 400
    assert 0.45 < share_hot < 0.75  # softmax([0.4, 0]) = 0.60
    assert share_cold == 1.0  # softmax([20, 0]): 1 - 2e-9


def test_min_new_tokens_masks_eos_and_stop_ids_unless_ignore_eos():
    logits = torch.tensor([0.0, 0.0, 10.0, 9.0, 0.0])
    params = {"temperature": 0, "min_new_tokens": 3, "stop_token_ids": [3]}
    assert one(logits, row(output=[4, 4], **params)) not in (2, 3)
    assert one(logits, row(output=[4, 4, 4], **params)) == 2
    assert one(logits, row(output=[4], ignore_eos=True, **params)) == 2


def test_repetition_penalty_over_prompt_and_output():
    # HF semantics: positive logits divided, negative ones multiplied.
    logits = torch.tensor([2.0, 1.9, -1.0, -1.1])
    assert one(logits, row(prompt=[0], temperature=0, repetition_penalty=1.5)) == 1
    assert one(logits, row(output=[0], temperature=0, repetition_penalty=1.5)) == 1
    assert one(logits, row(temperature=0, repetition_penalty=1.5)) == 0
    both_negative = torch.tensor([-1.0, -1.1])
    assert one(both_negative, row(prompt=[0], temperature=0, repetition_penalty=1.5)) == 1


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([2.0, 1.5, 0.0])
    # In the prompt only: no effect.
    assert one(logits, row(prompt=[0, 0], temperature=0, presence_penalty=1.0)) == 0
    # Presence: subtracted once however often the token appeared.
    assert one(logits, row(output=[0], temperature=0, presence_penalty=0.6)) == 1
    assert one(logits, row(output=[0, 0, 0], temperature=0, presence_penalty=0.4)) == 0
    # Frequency: subtracted per occurrence.
    assert one(logits, row(output=[0], temperature=0, frequency_penalty=0.4)) == 0
    assert one(logits, row(output=[0, 0], temperature=0, frequency_penalty=0.4)) == 1
    # Negative values encourage repetition.
    assert one(logits, row(output=[2], temperature=0, presence_penalty=-2.0, frequency_penalty=-1.0)) == 2


def test_presence_and_frequency_penalty_values():
    torch.manual_seed(0)
    logits = torch.randn(1, 10)
    r = row(output=[3, 3, 5], temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=0)
    expected = logits.clone()
    expected[0, 3] -= 0.5 + 2 * 0.25
    expected[0, 5] -= 0.5 + 0.25
    tokens, logprobs = sample(logits, [r], [EOS])
    assert tokens == [int(expected.argmax())]
    # logprobs are of the raw logits, not of the penalised ones
    assert logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, tokens[0]]))


def test_degenerate_distribution_falls_back_to_argmax():
    logits = torch.tensor([float("-inf"), 1.0, float("-inf")])
    assert draws(logits, top_p=0.3, min_p=0.5) == {1}
    nan_row = torch.tensor([float("nan"), float("nan")])
    assert one(nan_row, row(seed=3)) in (0, 1)


# ---- seeds and batches -------------------------------------------------------------------------


def test_seeded_rows_are_reproducible_whatever_the_batch():
    torch.manual_seed(0)
    steps = [torch.randn(6, 64) for _ in range(12)]
    params = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "min_p": 0.01}

    def run(position: int, batch_size: int, others_seeded: bool) -> list[int]:
        mine = row(seed=1234, **params)
        others = [row(seed=i if others_seeded else None, temperature=1.3) for i in range(batch_size - 1)]
        rows = others[:position] + [mine] + others[position:]
        out = []
        for logits in steps:
            batch = logits[:batch_size].clone()
            batch[position] = logits[5]  # my logits are the same in every batch
            tokens, _ = sample(batch, rows, [EOS])
            out.append(tokens[position])
        return out

    alone = run(0, 1, False)
    assert len(set(alone)) > 3
    assert run(2, 5, True) == alone
    assert run(4, 5, False) == alone
    assert run(0, 3, True) == alone


def test_seeded_generators_repeat_and_unseeded_rows_vary():
    logits = torch.randn(50)
    runs = [[one(logits, r) for _ in range(20)] for r in (row(seed=7), row(seed=7))]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    assert len({one(logits, row()) for _ in range(50)}) > 1


def test_fast_path_equals_slow_path():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    plain = [row(temperature=0) for _ in range(4)] + [row(top_k=1) for _ in range(4)]
    fast, fast_lp = sample(logits, plain, [EOS])
    assert fast == logits.argmax(-1).tolist() and fast_lp == [None] * 8
    # One row asking for logprobs takes the whole batch down the general path: same tokens.
    slow, slow_lp = sample(logits, [*plain[:-1], row(temperature=0, logprobs=0)], [EOS])
    assert slow == fast
    assert slow_lp[:-1] == [None] * 7 and slow_lp[-1] is not None
    # A mixed batch: the greedy rows still get their argmax.
    mixed, _ = sample(logits, [*plain[:4], *[row(seed=i) for i in range(4)]], [EOS])
    assert mixed[:4] == fast[:4]


def test_greedy_argmax_over_the_batch_with_penalties_per_row():
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    rows = [
        row(temperature=0),
        row(output=[0], temperature=0, repetition_penalty=2.0),
        row(output=[0], temperature=0, frequency_penalty=1.0),
    ]
    assert sample(logits, rows, [EOS])[0] == [0, 1, 1]
    assert logits[1, 0] == 2.0, "the caller's logits are not modified"


# ---- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits_with_top_n_best_first():
    torch.manual_seed(2)
    logits = torch.randn(3, 50) * 3
    rows = [row(temperature=0, logprobs=5), row(seed=0, temperature=0.7, logprobs=2), row(logprobs=0)]
    tokens, logprobs = sample(logits, rows, [EOS])
    expected = torch.log_softmax(logits, dim=-1)
    for i, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        assert lp is not None
        assert lp.logprob == pytest.approx(float(expected[i, token]), abs=1e-6)
        n = rows[i].params.logprobs
        assert len(lp.top) == n
        values, ids = torch.topk(expected[i], n) if n else (torch.tensor([]), torch.tensor([]))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:], strict=False))
        assert all(v <= 0 for _, v in lp.top) and lp.logprob <= 0
    # greedy: the sampled token is the top-1 alternative
    assert logprobs[0].top[0] == (tokens[0], logprobs[0].logprob)
    assert math.isclose(sum(math.exp(v) for v in expected[0].tolist()), 1.0, rel_tol=1e-5)


def test_logprobs_ignore_temperature_and_masks():
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0]])
    r = row(temperature=0, min_new_tokens=5, logprobs=2)
    tokens, logprobs = sample(logits, [r], [1])  # token 1 is eos, masked
    raw = torch.log_softmax(logits[0], -1)
    assert tokens == [3]
    assert logprobs[0].logprob == pytest.approx(float(raw[3]))
    assert logprobs[0].top[0][0] == 1  # the masked eos is still the model's favourite


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,field_name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"stop_token_ids": [5, 100]}, "stop_token_ids"),
        ({"logit_bias": ((5, 1.0), (100, 1.0))}, "logit_bias token ids"),
        ({"logit_bias": ((5, 100.5),)}, "logit_bias values"),
        ({"logit_bias": tuple((i, 1.0) for i in range(1025))}, "logit_bias has 1025 entries"),
    ],
)
def test_validate_sampling_names_the_field(changes, field_name):
    with pytest.raises(InvalidInputError, match=field_name):
        validate_sampling(dataclasses.replace(SamplingParams(), **changes), vocab_size=100)


def test_validate_sampling_accepts_the_edges():
    for changes in (
        {"temperature": 0.0, "top_p": 0.0, "top_k": -1, "min_p": 1.0, "logprobs": 20},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0, "logprobs": 0, "stop_token_ids": [0, 99]},
    ):
        validate_sampling(dataclasses.replace(SamplingParams(), **changes), vocab_size=100)
