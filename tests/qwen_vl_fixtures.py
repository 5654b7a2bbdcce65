"""Module-scoped fixtures of the Qwen-VL (v1) tests: a tiny checkpoint built on the fly (with the real
qwen.tiktoken), its tokenizer cache in a temporary MMSERVE_HOME, and the prompt adapter on it.
A test module names this module in its pytest_plugins."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def qwen_home(tmp_path_factory):
    """MMSERVE_HOME (the converted-tokenizer cache) in a temporary folder for this module."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("mmserve-home")
        mp.setenv("MMSERVE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory, qwen_home):
    pytest.importorskip("dashscope", reason="qwen.tiktoken ships in the dashscope wheel")
    from tests.checkpoints.qwen_vl import build_qwen_vl_checkpoint

    return build_qwen_vl_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen-vl", seed=0)


@pytest.fixture(scope="module")
def prompt(qwen_ckpt):
    from gateway.prompt_qwen_vl import QwenVLPrompt

    return QwenVLPrompt(str(qwen_ckpt), str(qwen_ckpt))
