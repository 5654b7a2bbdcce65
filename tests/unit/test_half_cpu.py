"""mmserve.half_cpu: half-precision layers computing large calls in float32 on CPUs without native
bf16/fp16 matmul (the weights, state dict and output dtype stay as they were)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmserve import half_cpu
from mmserve.half_cpu import (
    ENV,
    UpcastConv2d,
    UpcastConv3d,
    UpcastLinear,
    native_half_matmul,
    upcast_half_matmuls,
    upcast_rows,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 8, 4, stride=4)
        self.conv3 = nn.Conv3d(3, 8, (2, 4, 4), stride=(2, 4, 4), bias=False)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(16, 32, bias=False))


def tiny(dtype: torch.dtype) -> Tiny:
    torch.manual_seed(0)
    return Tiny().to(dtype)


def test_rows_threshold_follows_the_env_and_only_applies_to_half_weights_on_cpu(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert upcast_rows(torch.bfloat16, "cpu") == 3
    assert upcast_rows(torch.float16, "cpu") == 3
    assert upcast_rows(torch.float32, "cpu") == 0  # float32 computes natively everywhere
    assert upcast_rows(torch.bfloat16, "meta") == 0  # not a CPU: left alone
    monkeypatch.setenv(ENV, "0")
    assert upcast_rows(torch.bfloat16, "cpu") == 0
    for bad in ("many", "-3", "2.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            upcast_rows(torch.bfloat16, "cpu")
    monkeypatch.delenv(ENV)
    assert upcast_rows(torch.bfloat16, "cpu") == (0 if native_half_matmul(torch.bfloat16) else 8)


def test_swap_keeps_parameters_and_state_dict(monkeypatch):
    monkeypatch.setenv(ENV, "4")
    model = tiny(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert upcast_half_matmuls(model, torch.bfloat16, "cpu", "test") == 4
    assert type(model.conv2) is UpcastConv2d and type(model.conv3) is UpcastConv3d
    assert type(model.proj) is UpcastLinear and type(model.head[1]) is UpcastLinear
    assert model.proj.min_rows == 4
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_float32_models_and_env_zero_are_left_alone(monkeypatch):
    monkeypatch.setenv(ENV, "4")
    model = tiny(torch.float32)
    assert upcast_half_matmuls(model, torch.float32, "cpu", "test") == 0
    assert type(model.proj) is nn.Linear
    monkeypatch.setenv(ENV, "0")
    model = tiny(torch.bfloat16)
    assert upcast_half_matmuls(model, torch.bfloat16, "cpu", "test") == 0
    assert type(model.conv2) is nn.Conv2d


@pytest.mark.parametrize("rows", [1, 3, 4, 64])
def test_linear_computes_large_calls_in_float32_and_small_ones_natively(monkeypatch, rows):
    monkeypatch.setenv(ENV, "4")
    model = tiny(torch.bfloat16)
    native = model.proj.weight, model.proj.bias
    upcast_half_matmuls(model, torch.bfloat16, "cpu", "test")
    x = torch.randn(rows, 8).to(torch.bfloat16)
    out = model.proj(x)
    assert out.dtype == torch.bfloat16
    if rows < 4:
        assert torch.equal(out, F.linear(x, *native))
    else:
        expected = F.linear(x.float(), native[0].float(), native[1].float()).to(torch.bfloat16)
        assert torch.equal(out, expected)
    # either way the same product up to bf16 rounding
    reference = F.linear(x.float(), native[0].float(), native[1].float())
    torch.testing.assert_close(out.float(), reference, atol=0.02, rtol=0.02)


def test_rows_count_across_leading_dimensions(monkeypatch):
    """(batch, seq, hidden) inputs count batch x seq rows, and keep their shape."""
    monkeypatch.setenv(ENV, "4")
    model = tiny(torch.bfloat16)
    upcast_half_matmuls(model, torch.bfloat16, "cpu", "test")
    x = torch.randn(2, 3, 8).to(torch.bfloat16)  # 6 rows >= 4: float32
    out = model.proj(x)
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16
    w, b = model.proj.weight.float(), model.proj.bias.float()
    assert torch.equal(out, F.linear(x.float(), w, b).to(torch.bfloat16))


def test_large_weights_are_cast_in_slices_with_the_same_result(monkeypatch):
    """A weight over CHUNK_ELEMENTS is cast and multiplied a slice of rows at a time (here 3 slices,
    the last one short): the same float32 products as one cast of the whole weight."""
    monkeypatch.setattr(half_cpu, "CHUNK_ELEMENTS", 8 * 5)  # 5 weight rows of 8 per slice
    torch.manual_seed(1)
    layer = nn.Linear(8, 13).to(torch.bfloat16)
    x = torch.randn(2, 6, 8).to(torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    out = half_cpu.upcast_linear(x, layer.weight, layer.bias)
    assert out.shape == (2, 6, 13) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), atol=0, rtol=0)


def test_convolutions_match_float32_of_the_same_bf16_values(monkeypatch):
    monkeypatch.setenv(ENV, "4")
    model = tiny(torch.bfloat16)
    w2, b2, w3 = model.conv2.weight, model.conv2.bias, model.conv3.weight
    upcast_half_matmuls(model, torch.bfloat16, "cpu", "test")
    image = torch.randn(1, 3, 16, 16).to(torch.bfloat16)
    out = model.conv2(image)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.conv2d(image.float(), w2.float(), b2.float(), stride=4).to(torch.bfloat16))
    video = torch.randn(1, 3, 2, 16, 16).to(torch.bfloat16)
    out3 = model.conv3(video)
    assert torch.equal(out3, F.conv3d(video.float(), w3.float(), None, stride=(2, 4, 4)).to(torch.bfloat16))


@pytest.mark.parametrize("rows", ["0", "8"])
def test_decode_attention_in_bf16_matches_float32_either_way(monkeypatch, rows):
    """The decode attention's float32 path (small batches on CPUs without native bf16; forced here
    with the env) and its native bf16 path agree with float32 attention up to bf16 rounding."""
    from llm_service.attention.sdpa import _grouped_attention

    monkeypatch.setenv(ENV, rows)
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    keep = torch.rand(1, 3, 1, 40) > 0.3
    keep[..., 0] = True
    expected = _grouped_attention(q, k, v, keep, 0.25)  # float32 inputs: float32 throughout
    out = _grouped_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep, 0.25)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=0.03, rtol=0.03)
