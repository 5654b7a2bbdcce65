"""The prefix-cache key of an image span (a digest of the embedding received) and the admission
checks of embedding values: pure functions, no model."""

from __future__ import annotations

import hashlib

import pytest
import torch

from llm_service.engine.sequence import image_digest, image_keys
from llm_service.engine.validation import (
    MAX_EMBEDDING_ABS,
    RequestLimits,
    embedding_bound,
    validate_embedding_values,
    validate_request,
)
from mmserve.errors import InvalidInputError
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

BASE = torch.arange(32, dtype=torch.float32).view(4, 8) / 7


def test_same_values_same_digest_whatever_the_layout():
    assert image_digest(BASE) == image_digest(BASE.clone())
    transposed_back = BASE.t().contiguous().t()  # same values, column-major memory
    assert not transposed_back.is_contiguous()
    assert image_digest(transposed_back) == image_digest(BASE)


def test_one_changed_value_changes_the_digest():
    other = BASE.clone()
    other[3, 7] = torch.nextafter(other[3, 7], torch.tensor(100.0))  # one ulp
    assert image_digest(other) != image_digest(BASE)


def test_dtype_shape_and_grid_are_part_of_the_digest():
    # The same bytes read as another dtype or shape are another prompt.
    as_int = BASE.view(torch.int32)
    assert as_int.numpy().tobytes() == BASE.numpy().tobytes()
    assert image_digest(as_int) != image_digest(BASE)
    assert image_digest(BASE.view(8, 4)) != image_digest(BASE)
    assert image_digest(BASE, (1, 2, 2)) != image_digest(BASE)
    assert image_digest(BASE, (1, 2, 2)) != image_digest(BASE, (1, 4, 1))
    assert image_digest(BASE, (1, 2, 2)) == image_digest(BASE, [1, 2, 2])


def test_bfloat16_and_empty_tensors_hash():
    half = BASE.to(torch.bfloat16)
    assert image_digest(half) == image_digest(half.clone()) != image_digest(BASE)
    assert image_digest(torch.empty(0, 8)) != image_digest(torch.empty(0, 4))


def test_the_digest_is_not_a_plain_hash_of_the_bytes():
    # Domain-separated: an attacker who knows a tensor's bytes cannot pass them off as another key.
    assert image_digest(BASE) != hashlib.sha256(BASE.numpy().tobytes()).digest()


def test_image_keys_ignore_the_callers_content_hash():
    def keys(content_hash: str, embedding: torch.Tensor):
        request = GenerateRequest(
            "r", [1] + [9] * 4, [ImageSpan(1, embedding, content_hash)], SamplingParams()
        )
        return image_keys(request)

    assert keys("cat", BASE) == keys("dog", BASE) == keys("", BASE)
    assert keys("cat", BASE) != keys("cat", BASE + 1)  # garbage under a real image's hash
    (key,) = keys("cat", BASE)
    assert (key.offset, key.length, key.end) == (1, 4, 5)


# ---- embedding values ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_embeddings_are_refused_in_every_dtype(dtype, bad):
    embedding = BASE.to(dtype, copy=True)  # never the shared BASE itself
    embedding[2, 5] = bad
    with pytest.raises(InvalidInputError, match=r"image span 3: embedding contains non-finite values"):
        validate_embedding_values(embedding, torch.bfloat16, "image span 3")


def test_embedding_values_must_fit_the_bound():
    assert embedding_bound(torch.float32) == embedding_bound(torch.bfloat16) == MAX_EMBEDDING_ABS
    assert embedding_bound(torch.float16) == torch.finfo(torch.float16).max
    edge = BASE.clone()
    edge[0, 0], edge[0, 1] = MAX_EMBEDDING_ABS, -MAX_EMBEDDING_ABS
    validate_embedding_values(edge, torch.float32, "image span 0")  # the edges are allowed
    edge[1, 1] = 1e6
    with pytest.raises(InvalidInputError, match=r"image span 0: embedding values must be within"):
        validate_embedding_values(edge, torch.float32, "image span 0")
    validate_embedding_values(torch.empty(0, 8), torch.float32, "image span 0")


# ---- the request as a whole ---------------------------------------------------------------------

LIMITS = RequestLimits(vocab_size=100, max_model_len=64, image_token_id=9, hidden_size=8, dtype=torch.float32)


def good(**changes) -> GenerateRequest:
    request = GenerateRequest(
        "r-1", [1, 9, 9, 9, 9, 2], [ImageSpan(1, BASE.clone(), "cat")], SamplingParams(temperature=0.0)
    )
    for name, value in changes.items():
        setattr(request, name, value)
    return request


def span(offset=1, embedding=None, **kw) -> ImageSpan:
    return ImageSpan(
        offset, BASE.clone() if embedding is None else embedding, kw.pop("content_hash", "cat"), **kw
    )


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"request_id": ""}, "request_id is empty"),
        ({"request_id": "x" * 257}, "request_id has 257 characters"),
        ({"request_id": "a\nb"}, "request_id contains non-printable"),
        ({"token_ids": []}, "token_ids is empty"),
        ({"token_ids": [1] * 64}, "token_ids: prompt has 64 tokens"),
        ({"token_ids": [1, 9, 9, 9, 9, 100]}, "token_ids: token id 100 is outside"),
        ({"token_ids": [-1, 9, 9, 9, 9, 2]}, "token_ids: token id -1 is outside"),
        ({"images": [span(offset=-1)]}, "image span 0: offset -1 is negative"),
        ({"images": [span(length=0)]}, "image span 0 has length 0"),
        ({"images": [span(embedding=torch.zeros(4, 7))]}, "image span 0: embedding shape [4, 7]"),
        ({"images": [span(embedding=torch.zeros(4, 8, 1))]}, "image span 0: embedding shape [4, 8, 1]"),
        (
            {"images": [span(embedding=torch.zeros(4, 8, dtype=torch.int64))]},
            "image span 0: embedding dtype int64",
        ),
        ({"images": [span(content_hash="h" * 257)]}, "image span 0: content_hash has 257"),
        ({"images": [span(grid_thw=(1, 2))]}, "image span 0: grid_thw [1, 2]"),
        ({"images": [span(grid_thw=(1, 0, 4))]}, "image span 0: grid_thw [1, 0, 4]"),
        ({"images": [span(offset=3)]}, "image span 0 [3, 7) exceeds the 6 prompt tokens"),
        ({"images": [span(offset=0)]}, "image span 0 covers tokens other than the image placeholder"),
        ({"images": []}, "prompt has 4 image placeholder tokens but the image spans cover 0"),
        (
            {"images": [span(embedding=BASE[:2].clone()), span(offset=2, embedding=BASE[:2].clone())]},
            "image span 1: offset 2 overlaps or precedes",
        ),
        (
            {
                "images": [
                    span(offset=3, embedding=BASE[:2].clone()),
                    span(offset=1, embedding=BASE[:2].clone()),
                ]
            },
            "image span 1: offset 1 overlaps or precedes",
        ),
        (
            {"images": [span(embedding=BASE.clone().fill_(float("nan")))]},
            "image span 0: embedding contains non-finite",
        ),
    ],
)
def test_validate_request_names_the_field(changes, needle):
    with pytest.raises(InvalidInputError) as info:
        validate_request(good(**changes), LIMITS)
    assert needle in str(info.value)


def test_a_good_request_and_two_adjacent_spans_pass():
    validate_request(good(), LIMITS)
    halves = [span(embedding=BASE[:2].clone()), span(offset=3, embedding=BASE[2:].clone())]
    validate_request(good(images=halves), LIMITS)
