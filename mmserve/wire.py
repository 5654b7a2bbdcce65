"""Domain types that cross process boundaries.

The gateway talks to the vision and LLM services through these types; the gRPC clients and
servers convert them at the edge with mmserve.wire_pb (their only protobuf conversions), and the
in-process clients of the Python API pass the same objects without any conversion.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from mmserve.sampling import SamplingParams


@dataclass(frozen=True)
class ImageInput:
    """Encoded image bytes and their hex SHA-256."""

    data: bytes
    content_hash: str


@dataclass(frozen=True)
class PixelLimits:
    """Per-request bounds of a resized image's area (dynamic-resolution families: Qwen2-VL, Qwen2.5-VL).

    None: the vision service's default. vLLM's `mm_processor_kwargs` names.
    """

    min_pixels: int | None = None
    max_pixels: int | None = None

    def __bool__(self) -> bool:
        return self.min_pixels is not None or self.max_pixels is not None


@dataclass(frozen=True)
class ImageFeatures:
    """The vision encoder's output for one image."""

    embedding: torch.Tensor  # (N_i, hidden)
    content_hash: str
    grid_thw: tuple[int, ...] = ()  # Qwen2-VL family only

    @property
    def num_tokens(self) -> int:
        return int(self.embedding.shape[0])


@dataclass(frozen=True)
class ImageSpan:
    """Embeddings that overwrite `length` placeholder tokens starting at `offset`."""

    offset: int
    embedding: torch.Tensor  # (length, hidden)
    content_hash: str
    grid_thw: tuple[int, ...] = ()
    length: int = -1  # -1: taken from embedding rows

    def __post_init__(self):
        if self.length < 0:
            object.__setattr__(self, "length", int(self.embedding.shape[0]))


@dataclass
class GenerateRequest:
    request_id: str
    token_ids: list[int]
    images: list[ImageSpan]
    sampling: SamplingParams


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class TokenLogprobs:
    """Log-probability of one sampled token and the top alternatives at its step."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class GenerateOutput:
    """One message of a generation stream; the last one has finish_reason and usage."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when requested


@dataclass(frozen=True)
class LLMInfo:
    """Static facts about the served language model."""

    family: str
    max_model_len: int
    image_token_id: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str = ""  # of the served weights
