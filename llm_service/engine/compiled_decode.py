"""The decoder compiled with torch.compile (inductor) for decode-only steps on the sdpa backend.

A decode step at batch 1 is ~100 small torch ops per layer besides its matmuls (RMSNorm, rotary, the
KV writes, the staged attention's softmax), and on CPU each op's dispatch costs more than its work.
Inductor fuses them into a few generated C++ loops and keeps the matmuls as library calls: measured
on the benchmark anchor (2 AVX2 cores, bf16), the step goes 13-15 -> 10-11 ms at batch 1, 56-64 ->
39-45 ms at 8, 120 -> 99-104 ms at 32 (benchmarks/RESULTS.md, "Against vLLM-CPU").

What is compiled: `DecoderLM.forward` (embeddings in, hidden states out: every layer, attention
included), for steps whose rows are all decodes reading the decode staging rows with no row to fill
first. Every other step (prefill chunks, a decode's first step in its row, decodes that gather their
blocks) runs eagerly. The final norm, the lm_head and the sampler stay eager too (the lm_head is one
large matmul).

Shapes are dynamic (`dynamic=True`, and size-1 dims are not specialized), so one graph serves every
batch size and context length; the few branches the code takes on sizes (a half model's Linear layers
compute >= 8 rows in float32, mmserve.half_cpu) give at most a second graph. Both are compiled at
start-up (`warm_up`), not on a user's request: ~25 s each on 2 cores with an empty cache, a few
seconds when inductor's on-disk cache has them (TORCHINDUCTOR_CACHE_DIR).

If compiling or running a compiled step fails (no C++ compiler, an unsupported op), the error is
logged, compilation is turned off for the process, and the step reruns eagerly (a decode step's writes
to the KV cache and staging rows are the same values at the same places, so a rerun is safe).

`--compile` / LLM_COMPILE: auto (the default: on for the sdpa backend on CPU when a C++ compiler is
found), on, off.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator

import torch

from llm_service.attention import SdpaMetadata
from mmserve.step_health import describe

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call, if one is on PATH."""
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    for name in [n for n in names if n] + ["g++", "c++", "clang++"]:
        if shutil.which(name):
            return name
    return None


def wanted(mode: str, backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether to compile the decode step, and why (logged)."""
    if mode not in MODES:
        raise ValueError(f"compile must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False, "off (--compile off)"
    if backend != "sdpa":
        return False, f"off: only the sdpa backend's decode step is compiled ({backend} attention)"
    if mode == "on":
        return True, "on (--compile on)"
    if device.type != "cpu":
        return False, "off: auto compiles on CPU only (--compile on to compile on CUDA)"
    if cxx_compiler() is None:
        return False, "off: no C++ compiler on PATH for inductor (install g++, or --compile off to silence)"
    return True, "on (auto: CPU, sdpa attention, a C++ compiler found)"


class CompiledDecoder:
    """`decoder` (a DecoderLM) compiled for decode-only staged steps; `handles` says which steps."""

    def __init__(self, decoder: torch.nn.Module):
        self.eager: Callable[..., torch.Tensor] = decoder
        self.compiled: Callable[..., torch.Tensor] = torch.compile(decoder, fullgraph=True)
        self.warming_up = False
        self.failed: str | None = None  # why compilation was turned off
        self.steps = 0  # steps that ran compiled

    def handles(self, num_tokens: int, meta) -> bool:
        return (
            self.failed is None
            and isinstance(meta, SdpaMetadata)
            and meta.num_decodes == num_tokens
            and meta.stage is not None
            and not meta.stage.fills
        )

    def __call__(self, embeds, positions, kv_caches, meta, attend) -> torch.Tensor:
        if self.warming_up:
            mark_dynamic(embeds, positions, kv_caches, meta)
        try:
            with _tracing_settings():
                hidden = self.compiled(embeds, positions, kv_caches, meta, attend)
        except Exception as exc:  # noqa: BLE001 - any failure turns compilation off, the step reruns eagerly
            self.failed = describe(exc)
            log.warning("the compiled decode step failed; decoding eagerly from now on: %s", self.failed)
            return self.eager(embeds, positions, kv_caches, meta, attend)
        self.steps += 1
        return hidden

    def warm_up(self, run_decode: Callable[[int], bool], batch_sizes: list[int]) -> None:
        """Compile now: `run_decode(n)` runs a decode-only step of n sequences through this."""
        started = time.monotonic()
        self.warming_up = True
        try:
            for size in batch_sizes:
                if not run_decode(size) or self.failed:
                    break
        finally:
            self.warming_up = False
        if self.failed:
            log.warning("decode step not compiled (%s); it runs eagerly", self.failed)
        else:
            log.info(
                "decode step compiled for batch sizes %s in %.1fs", batch_sizes, time.monotonic() - started
            )


@contextlib.contextmanager
def _tracing_settings() -> Iterator[None]:
    """Settings read while a graph is traced and compiled (here, not process-wide: the vision tower's
    compile in the same process keeps its own): a dim marked dynamic stays symbolic at size 1 (a
    batch of 1 in one staging row), dims of equal size get separate symbols (a context of 64 tokens
    is not the head size), and inductor rounds half-precision intermediates where eager code does."""
    from torch._inductor import config as inductor_config
    from torch.fx.experimental import _config as shapes_config

    with (
        shapes_config.patch(backed_size_oblivious=True, use_duck_shape=False),  # type: ignore[attr-defined]
        inductor_config.patch(emulate_precision_casts=True),
    ):
        yield


def mark_dynamic(embeds, positions, kv_caches, meta) -> None:
    """The dims that change from step to step: the batch (D decodes), the staging rows in use (R) and
    their columns (L), and the staging buffers' allocated rows and columns. Everything else (weights,
    the paged cache, head sizes) stays static, which keeps the traced graph's symbolic shapes few."""
    stage = meta.stage
    for tensor, dims in (
        (embeds, [0]),
        (positions, [positions.dim() - 1]),
        (meta.slot_mapping, [0]),
        (stage.rows, [0]),
        (stage.slots, [0]),
        (stage.valid, [0, 1]),
    ):
        for dim in dims:
            torch._dynamo.mark_dynamic(tensor, dim)
    for cache in kv_caches:
        for tensor in (cache.stage_k, cache.stage_v):
            torch._dynamo.mark_dynamic(tensor, 0)
            torch._dynamo.mark_dynamic(tensor, 2)
