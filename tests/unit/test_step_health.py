"""StepHealth (mmserve/step_health.py): which failures count, which are fatal, what resets them; and the
sampler's check for logits that are garbage."""

from __future__ import annotations

import torch

from llm_service.sampler import nonfinite_rows
from mmserve.step_health import StepHealth, describe, is_fatal


def test_failures_in_a_row_fail_it_and_a_success_resets_the_count():
    health = StepHealth(limit=3)
    assert not health.failed(RuntimeError("a"), "engine step")
    assert not health.failed(RuntimeError("b"), "engine step")
    health.succeeded()
    assert not health.failed(RuntimeError("c"), "engine step")
    assert not health.failed(RuntimeError("d"), "engine step")
    assert health.ok
    assert health.failed(ValueError("e"), "engine step")
    assert not health.ok and health.reason == "3 consecutive engine step failures, the last ValueError: e"
    health.succeeded()  # failed for good: only a restart heals
    assert not health.ok


def test_a_cuda_error_is_fatal_and_out_of_memory_is_not():
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal(RuntimeError("device-side assert triggered"))
    assert not is_fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_fatal(RuntimeError("expanded size 65 must match the existing size 66"))
    health = StepHealth()
    assert health.failed(RuntimeError("CUDA error: misaligned address"), "encoder forward")
    assert health.reason == "a fatal encoder forward failure (RuntimeError: CUDA error: misaligned address)"


def test_describe_is_one_bounded_line():
    assert describe(KeyError()) == "KeyError"
    text = describe(RuntimeError("x\n" * 500))
    assert "\n" not in text and len(text) < 220


def test_nonfinite_rows_names_the_rows_holding_nan_or_inf():
    logits = torch.zeros(4, 8)
    assert nonfinite_rows(logits) == []
    logits[1, 3] = torch.nan
    logits[3, 0] = torch.inf
    logits[2, 5] = -1e30  # very negative is finite: not garbage
    assert nonfinite_rows(logits) == [1, 3]


def test_nonfinite_rows_finds_them_by_value_where_a_sum_overflows():
    logits = torch.randn(4, 1000)
    assert nonfinite_rows(logits) == []
    logits[1, 5], logits[3, 0] = float("nan"), float("-inf")
    assert nonfinite_rows(logits) == [1, 3]
    huge = torch.full((2, 1000), 3e38)  # finite, though their sum is not
    assert nonfinite_rows(huge) == []
