"""Weight reads answered from an in-memory checkpoint of meta tensors laid out under the real on-disk key
names, for tests that build the families' adapters at full size without weights: every family module's
weight reads are patched, and any Hub download fails the test."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

ADAPTER_MODULES = (
    "llm_service.models.llava",
    "llm_service.models.llava_original",
    "llm_service.models.qwen2_vl",
    "llm_service.models.qwen_vl",
    "vision_service.models.llava",
    "vision_service.models.llava_next",
    "vision_service.models.llava_original",
    "vision_service.models.qwen2_vl",
    "vision_service.models.qwen_vl",
    "mmserve.checkpoint",
)


class _LlamaTokenizerStub:
    """What image_placeholder_id reads of liuhaotian/llava-v1.5-7b's LLaMA tokenizer (special_tokens_map:
    unk = pad = <unk> = 0; no <image> or <im_patch> token, since mm_use_im_patch_token is false)."""

    unk_token_id = 0
    pad_token_id = 0

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def convert_tokens_to_ids(self, token):
        return {"<unk>": 0, "<s>": 1, "</s>": 2}.get(token, self.unk_token_id)


def serve_from_memory(monkeypatch, disk: dict[str, dict[str, torch.Tensor]]) -> None:
    """The adapters' weight reads answered from `disk`: checkpoint folder -> key -> tensor."""

    def folder(checkpoint) -> dict[str, torch.Tensor]:
        return disk[str(Path(checkpoint))]

    def load_weights(checkpoint, rename, dtype=None):
        state = {}
        for key, tensor in folder(checkpoint).items():
            for prefix, replacement in rename.items():
                if key.startswith(prefix):
                    state[replacement + key[len(prefix) :]] = tensor
                    break
        return state

    def first_prefix_present(checkpoint, candidates):
        from mmserve.errors import CheckpointError

        for prefix in candidates:
            if any(k.startswith(prefix) for k in folder(checkpoint)):
                return prefix
        raise CheckpointError(f"{checkpoint}: no weight key starts with any of {candidates}")

    def snapshot_download(*args, **kwargs):
        raise AssertionError("the network was asked for a checkpoint")

    for name in ADAPTER_MODULES:
        module = importlib.import_module(name)
        for attr, fake in (
            ("load_weights", load_weights),
            ("first_prefix_present", first_prefix_present),
            ("weight_keys", lambda c: list(folder(c))),
        ):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, fake)
    monkeypatch.setattr("llm_service.models.llava_original.AutoTokenizer", _LlamaTokenizerStub)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
