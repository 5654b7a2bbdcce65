"""bfloat16 / float16 weights on a CPU that has no native half-precision matmul.

On x86 CPUs without AVX-512 BF16 / AMX (AVX2-only machines, many AMD EPYCs), torch 2.13 runs a
bf16 `F.linear` as one matrix-vector product per row (~0.4 ms per row for 1024x4096) and a bf16
conv2d ~40x slower than float32. Measured on a 2-core AVX2 EPYC (2 threads, weight shapes N x K):

    rows                      1      8      32     616
    4096 x 1024     bf16    0.42   3.3    13.1    250   ms
                    upcast  0.76   2.4     3.7     34   ms  (weight cast to float32 in 4 MB slices)
    32064 x 512     bf16    2.0   13.7    55     1140   ms  (an lm_head)
                    upcast  4.0    7.4    13.6    177   ms

So these layers keep the checkpoint's dtype in memory (the KV cache, the weights, every activation
stay as the user chose) and compute a call of at least `min_rows` rows in float32, casting the result
back; smaller calls (decoding a few sequences) stay native, where the cast would cost more than it
saves. Float32 accumulation is what the native kernels do too; only the rounding of the inputs to the
matmul are the same bf16 values, so outputs differ from native bf16 by summation order at most.

`MMSERVE_CPU_UPCAST_ROWS` overrides: 0 turns it off, N sets the row threshold (also on CPUs with native
support, to compare).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
DEFAULT_MIN_ROWS = 8  # at 8 rows the cast wins for every shape measured; at 1 it loses
ENV = "MMSERVE_CPU_UPCAST_ROWS"
CHUNK_ELEMENTS = 1 << 20  # weight elements cast to float32 per slice (4 MB)


@functools.cache  # the CPU does not change; asked on every small decode attention (llm_service sdpa)
def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has matmul instructions for `dtype` (oneDNN uses them when present)."""
    if dtype == torch.bfloat16:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if dtype == torch.float16:
        return bool(torch.cpu._is_amx_fp16_supported())
    return True  # float32 and the rest: nothing to work around


def upcast_rows(dtype: torch.dtype, device: torch.device | str) -> int:
    """The row threshold to use for a model of `dtype` on `device` (0: leave the layers alone)."""
    if torch.device(device).type != "cpu" or dtype not in HALF:
        return 0
    configured = os.environ.get(ENV, "").strip()
    if configured:
        rows = int(configured) if configured.isdigit() else -1
        if rows < 0:
            raise ValueError(f"{ENV} must be a whole number of rows >= 0 (0 = off), got {configured!r}")
        return rows
    return 0 if native_half_matmul(dtype) else DEFAULT_MIN_ROWS


class UpcastLinear(nn.Linear):
    min_rows = DEFAULT_MIN_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # traced (llm_service/engine/compiled_decode.py): matmul into
            # `out=` slices does not trace; inductor plans the float32 weight's buffer itself
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return upcast_linear(x, self.weight, self.bias)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear computed in float32, the weight cast a slice of CHUNK_ELEMENTS at a time: casting a
    large weight at once (a 32064 x 512 lm_head: 64 MB of float32) spends most of its time in page
    faults on the fresh buffer (29 ms, vs 4 ms in slices that the allocator reuses). Inference only:
    no autograd graph is recorded (matmul into `out=` slices has none)."""
    with torch.no_grad():
        return _upcast_linear(x, weight, bias)


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    step = max(1, CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        end = start + step
        torch.matmul(flat, weight[start:end].float().t(), out=out[:, start:end])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _float32_conv(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    return conv._conv_forward(x.float(), conv.weight.float(), bias).to(x.dtype)


class UpcastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_conv(self, x)


class UpcastConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_conv(self, x)


_SWAPS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Linear, UpcastLinear),
    (nn.Conv2d, UpcastConv2d),
    (nn.Conv3d, UpcastConv3d),
)


def upcast_half_matmuls(model: nn.Module, dtype: torch.dtype, device: torch.device | str, what: str) -> int:
    """Make `model`'s half-precision Linear/Conv layers compute large calls in float32 when this CPU
    lacks native support (see the module doc). Swaps the classes in place (same parameters, same
    state dict); returns how many layers changed."""
    min_rows = upcast_rows(dtype, device)
    if not min_rows:
        return 0
    changed = 0
    for module in model.modules():
        for plain, upcast in _SWAPS:
            if type(module) is plain:
                module.__class__ = upcast
                if isinstance(module, UpcastLinear):
                    module.min_rows = min_rows
                changed += 1
    log.info(
        "%s: this CPU has no native %s matmul: %d Linear/Conv layers compute calls of >= %d rows in "
        "float32 (weights stay %s; %s=0 turns this off)",
        what,
        str(dtype).removeprefix("torch."),
        changed,
        min_rows,
        str(dtype).removeprefix("torch."),
        ENV,
    )
    return changed
