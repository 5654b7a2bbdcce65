"""bfloat16 / float16 weights on a CPU that has no native half-precision matmul.

On x86 CPUs without AVX-512 BF16 / AMX (AVX2-only machines, many AMD EPYCs), torch 2.13 runs a
bf16 `F.linear` as one matrix-vector product per row (~0.45 ms per row for 1024x4096) and a bf16
conv2d ~40x slower than float32. Measured on a 2-core AVX2 EPYC (1024 -> 4096, 2 threads):

    rows          1      8      32     616     2048
    bf16        0.73   3.9    16.0   289      830   ms
    upcast      4.65   3.9     8.0    45      116   ms  (weight and input cast to float32 per call)

So these layers keep the checkpoint's dtype in memory (the KV cache, the weights, every activation
stay as the user chose) and compute a call of at least `min_rows` rows in float32, casting the result
back; smaller calls (decoding a few sequences) stay native, where the cast would cost more than it
saves. Float32 accumulation is what the native kernels do too; only the rounding of the inputs to the
matmul is the same bf16 values, so outputs differ from native bf16 by rounding order at most.

`MMSERVE_CPU_UPCAST_ROWS` overrides: 0 turns it off, N sets the row threshold (also on CPUs with native
support, to compare).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
DEFAULT_MIN_ROWS = 8  # the measured break-even above (3.9 ms both ways)
ENV = "MMSERVE_CPU_UPCAST_ROWS"


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
        try:
            return max(0, int(configured))
        except ValueError:
            raise ValueError(f"{ENV} must be a whole number of rows (0 = off), got {configured!r}") from None
    return 0 if native_half_matmul(dtype) else DEFAULT_MIN_ROWS


class UpcastLinear(nn.Linear):
    min_rows = DEFAULT_MIN_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class UpcastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


class UpcastConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


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
