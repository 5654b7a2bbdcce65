"""The engine's configuration: queue and batch bounds, KV cache size and layout, attention backend."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.attention import BACKENDS
from llm_service.engine.compiled_decode import MODES as COMPILE_MODES


@dataclass
class EngineConfig:
    max_waiting: int = 256  # requests queued beyond this get OverloadedError (RESOURCE_EXHAUSTED)
    max_running: int = 128  # sequences in the running batch at once
    max_model_len: int = 0  # prompt + output cap per sequence; 0 = the model's (and the cache's) limit
    max_num_batched_tokens: int = 2048  # tokens per step: the chunked-prefill budget
    kv_cache_bytes: int = 0  # KV cache budget; 0 = 2 GiB on CPU, 90% of free memory on CUDA
    block_size: int = 16  # tokens per KV block (the flash_attn backend uses 256)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto (flash_attn on CUDA when installed, else sdpa) | sdpa | flash_attn
    decode_staging_bytes: int = 512 << 20  # sdpa: contiguous copies of the decodes' KV; 0 = off
    compile: str = "auto"  # torch.compile the decode step: auto (sdpa on CPU with a C++ compiler) | on | off

    def __post_init__(self):
        if min(self.max_waiting, self.max_running, self.max_num_batched_tokens, self.block_size) < 1:
            raise ValueError("max_waiting, max_running, max_num_batched_tokens and block_size must be >= 1")
        if min(self.max_model_len, self.kv_cache_bytes, self.decode_staging_bytes) < 0:
            raise ValueError("max_model_len, kv_cache_bytes and decode_staging_bytes must be >= 0")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
