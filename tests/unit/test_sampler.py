import torch

from llm_service.sampler import make_generator, sample_next
from mmserve.wire import SamplingParams

EOS = 2


def draw(logits, n=200, **params):
    p = SamplingParams(**params)
    gen = make_generator(SamplingParams(seed=0))
    return {sample_next(logits, p, [], 5, [EOS], gen) for _ in range(n)}


def test_greedy_by_temperature_zero_or_top_k_one():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_next(logits, SamplingParams(temperature=0), [], 0, [EOS], None) == 1
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), [], 0, [EOS], None) == 1


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.9, 4.8, 0.0, 0.0, 0.0])
    assert draw(logits, top_k=2) <= {0, 1}
    assert draw(logits, top_k=3) == {0, 1, 2}
    # The first three tokens hold ~98% of the mass; top_p=0.5 keeps the first two only.
    assert draw(logits, top_p=0.5) <= {0, 1}
    assert draw(logits, top_p=0.01) == {0}


def test_min_new_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([0.0, 0.0, 10.0, 9.0, 0.0])
    params = SamplingParams(temperature=0, min_new_tokens=3, stop_token_ids=[3])
    assert sample_next(logits, params, [], 0, [EOS], None) not in (2, 3)
    assert sample_next(logits, params, [], 3, [EOS], None) == 2


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    assert (
        sample_next(logits, SamplingParams(temperature=0, repetition_penalty=1.5), [0], 1, [EOS], None) == 1
    )


def test_seeded_generators_repeat():
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0, seed=7)
    runs = [
        [sample_next(logits, params, [], 0, [], g) for _ in range(20)]
        for g in (make_generator(params), make_generator(params))
    ]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1
