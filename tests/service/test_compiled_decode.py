"""The compiled decode step (llm_service/engine/compiled_decode.py) on the real engine and model, in
float32 (LLaVA's Llama decoder, and Qwen2.5-VL-7B's real Hub config shrunk): the same tokens as the
eager step (and logprobs within float32 rounding) over a workload where
prefills are chunked, sequences are preempted and refilled, and staging rows come and go; every graph
it needs is compiled at start-up, none while serving; and a compile that fails leaves an engine that
decodes eagerly, with the same tokens."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from llm_service.config import LLMConfig
from llm_service.engine import compiled_decode
from llm_service.models import load_language_model
from tests.checkpoints.hub import build_from_hub
from tests.service.test_decode_staging import run


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model = load_language_model(LLMConfig(checkpoint=str(tiny_checkpoint)))
    assert model.dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def qwen2_5_vl_model(tmp_path_factory):
    """Qwen2.5-VL-7B's real Hub files, sizes shrunk (tests/checkpoints/hub.py): M-RoPE, (3, T) positions
    through the compiled rotary, grouped-query attention (4 heads over 2 KV heads), q/k/v biases."""
    checkpoint = build_from_hub("qwen2_5_vl_7b", tmp_path_factory.mktemp("ckpt") / "q25", dtype="float32")
    model = load_language_model(LLMConfig(checkpoint=str(checkpoint), dtype="float32"))  # config says bf16
    config = model.decoder.config
    assert model.dtype == torch.float32 and model.position_dims == 3
    assert config.num_heads > config.num_kv_heads and config.qkv_bias
    return model


@pytest.mark.parametrize(
    "which", ["model", "qwen2_5_vl_model"], ids=["llava-llama", "qwen2.5-vl-hub-gqa-mrope"]
)
def test_compiled_decode_steps_give_the_eager_tokens_and_compile_only_at_start_up(
    which, request, monkeypatch
):
    model = request.getfixturevalue(which)
    eager, _ = run(model, compile="off")

    graphs_before = counters["stats"]["unique_graphs"]
    compiled_graphs = []
    original_warm_up = compiled_decode.CompiledDecoder.warm_up

    def warm_up(self, run_decode, batch_sizes):
        original_warm_up(self, run_decode, batch_sizes)
        compiled_graphs.append(counters["stats"]["unique_graphs"])  # after start-up, before any request

    monkeypatch.setattr(compiled_decode.CompiledDecoder, "warm_up", warm_up)
    compiled, engine = run(model, compile="on")

    step = engine.runner.compiled
    assert step.failed is None
    assert step.steps >= 10  # decode-only steps ran compiled (most steps here also prefill a chunk)
    assert compiled_graphs[0] > graphs_before  # start-up compiled graphs ...
    assert counters["stats"]["unique_graphs"] == compiled_graphs[0]  # ... and serving compiled none
    assert [tokens for tokens, _ in compiled] == [tokens for tokens, _ in eager]
    for (_, got), (_, want) in zip(compiled, eager, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_a_compile_that_fails_leaves_an_engine_that_decodes_eagerly(model, monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        def compiled(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return compiled

    eager, _ = run(model, compile="off")
    monkeypatch.setattr(compiled_decode.torch, "compile", no_compiler)
    results, engine = run(model, compile="on")

    assert "InvalidCxxCompiler" in engine.runner.compiled.failed
    assert engine.runner.compiled.steps == 0
    assert "decode step not compiled" in caplog.text
    assert results == eager


@pytest.mark.parametrize(
    ("mode", "backend", "device", "compiler", "on"),
    [
        ("auto", "sdpa", "cpu", "g++", True),
        ("auto", "sdpa", "cpu", None, False),  # no C++ compiler: inductor cannot build its kernels
        ("auto", "sdpa", "cuda", "g++", False),
        ("auto", "flash_attn", "cuda", "g++", False),
        ("on", "sdpa", "cpu", None, True),  # asked for: it is tried (and falls back if it fails)
        ("on", "flash_attn", "cuda", "g++", False),  # only the sdpa step is compiled
        ("off", "sdpa", "cpu", "g++", False),
    ],
)
def test_when_the_decode_step_is_compiled(monkeypatch, mode, backend, device, compiler, on):
    monkeypatch.setattr(compiled_decode, "cxx_compiler", lambda: compiler)
    wanted, why = compiled_decode.wanted(mode, backend, torch.device(device))
    assert wanted is on, why


def test_an_unknown_compile_mode_is_refused():
    from llm_service.engine import EngineConfig

    with pytest.raises(ValueError, match="compile must be one of"):
        EngineConfig(compile="fast")
