"""The three halves of a model family, declared: what each process asks of the family it serves.

Each family implements every half in one module per process (vision_service/models/, llm_service/models/,
gateway/prompt*.py) by subclassing these classes; mmserve/families.py hands the classes out and refuses
one that does not implement its half. Consumers use plain attribute access, never probing: what a family
may leave out has a default here (no per-image cost, no grid, no pixel bounds, no inline image urls).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from mmserve.wire import GenerateRequest


class VisionAdapter(ABC):
    """vision_service: images -> embedding rows. Implemented by a torch.nn.Module whose
    `forward(**collate(items))` returns one (N_i, hidden_size) tensor per image; the encoder calls the
    static methods without an instance (preprocessing workers load only the processor)."""

    family: ClassVar[str]
    # Accepts min_pixels / max_pixels (server-wide and per request) in preprocess_one.
    dynamic_resolution: ClassVar[bool] = False
    config: Any  # the family's config: its transformers class, or a typed stand-in with the same fields
    vision_tower: Any  # the torch module --compile replaces with its compiled form

    @abstractmethod
    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """The keyword arguments of `collate` -> one (N_i, hidden_size) tensor per image."""

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, checkpoint: str, dtype: torch.dtype, device: str) -> VisionAdapter:
        """This half's weights only (the LM is never read), on `device`, in eval mode."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of one embedding row (the language model's hidden size)."""

    @staticmethod
    @abstractmethod
    def load_processor(checkpoint: str) -> Any:
        """The image processor preprocess_one is given (loaded once per worker)."""

    @staticmethod
    @abstractmethod
    def preprocess_one(processor: Any, image: Image.Image) -> dict[str, np.ndarray]:
        """One decoded image -> its model inputs, without a batch dimension. Dynamic-resolution
        families also take min_pixels= / max_pixels= (the encoder passes them to no other family)."""

    @staticmethod
    @abstractmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inputs of several images (of any requests) -> the keyword arguments of one forward."""

    @staticmethod
    def cost(item: dict[str, torch.Tensor]) -> int:
        """Encoder work of one image, bounded per forward by the batcher; 0 = counted by images only."""
        return 0

    @staticmethod
    def grid_thw(item: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """The image's [t, h, w] patch grid sent with its embedding (M-RoPE families); () = none."""
        return ()

    @staticmethod
    def max_pixels(processor: Any) -> int:
        """The checkpoint's bound on a resized image's area (dynamic resolution); 0 = none."""
        return 0


class LanguageAdapter(ABC):
    """llm_service: the decoder the engine runs, the facts about it, and its token positions.
    The constructor reads the language half of a checkpoint only, never the vision tower."""

    family: ClassVar[str]
    position_dims: ClassVar[int] = 1  # 3 for M-RoPE models: positions() returns (3, n)
    decoder: Any  # a llm_service.models.decoder.DecoderLM: forward(embeds, positions, ...), logits()
    device: torch.device
    dtype: torch.dtype
    image_token_id: int  # the prompt id whose embedding rows are the image's
    vocab_size: int
    hidden_size: int
    max_model_len: int
    eos_token_ids: list[int]

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: str) -> None:
        """Each family loads its language half here (not abstract: benchmarks build random models
        through `__new__` on a base class)."""
        raise NotImplementedError(f"{type(self).__name__} does not load checkpoints")

    @abstractmethod
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids -> (T, hidden_size) embeddings on the model's device."""

    @abstractmethod
    def positions(self, seq: Any, start: int, end: int) -> torch.Tensor:
        """RoPE positions of tokens [start, end) of a sequence: (n,), or (3, n) when position_dims is 3."""

    def validate_request(self, request: GenerateRequest) -> None:  # noqa: B027 - a hook, no-op by default
        """Family-specific admission checks (INVALID_ARGUMENT); none by default."""


class PromptAdapter(ABC):
    """gateway: chat rendering, image tags and tokenization of one family's prompts."""

    family: ClassVar[str]
    image_tag: ClassVar[str]  # how errors name the image tag to the user
    tokenizer: Any  # a transformers tokenizer
    image_token_id: int  # one per image after tokenizing; the gateway expands it to N_i rows

    @abstractmethod
    def __init__(self, checkpoint: str, tokenizer_path: str, chat_template: str | None = None) -> None:
        """`chat_template`: a --chat-template override (a file or Jinja text); families whose chat format
        is built in refuse one."""

    @abstractmethod
    def render_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
        """Messages in transformers' multimodal format ({"type": "image"} parts) -> prompt text."""

    @abstractmethod
    def normalize_raw(self, prompt: str) -> str:
        """A raw prompt (/v1/completions, Pipeline) with the accepted image tag aliases made canonical."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Prompt text -> ids, one image_token_id per image."""

    def extract_images(self, text: str, urls: list[str]) -> tuple[str, list[str]]:
        """(prompt, urls passed with it) -> (prompt, every image url in prompt order). Families whose
        prompts carry urls inline (Qwen-VL's <img>URL</img>) take them out here; others keep both."""
        return text, list(urls)


HALVES: dict[str, type[ABC]] = {
    "vision": VisionAdapter,
    "language": LanguageAdapter,
    "prompt": PromptAdapter,
}
