"""dtype "auto": each service serves the checkpoint's own dtype, and loading it costs its bytes once.

A bf16 checkpoint served with no dtype setting runs both services in bf16 (read back over the wire);
the LLM half's peak memory while loading is measured in a real process running the service's own
loading code, for the same checkpoint served in bf16 and in float32.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
import torch

from mmserve.checkpoint import checkpoint_dtype, resolve_dtype
from mmserve.proto import vision_pb2, vision_pb2_grpc
from tests.helpers import ROOT, Stack, greedy_chat, openai_client
from tools.checkpoints import LlavaShape, build_llava_checkpoint

# ~110M language-model parameters: 440 MB in float32, 220 MB in bf16 (the rest of the process is
# imports, measured away by resetting the peak before loading).
LARGE_TEXT = LlavaShape(
    text_hidden=1024, text_intermediate=2816, text_layers=8, text_heads=8, text_kv_heads=8
)


def test_checkpoint_dtype_reads_every_spelling():
    assert checkpoint_dtype({"torch_dtype": "bfloat16"}) == "bfloat16"
    assert checkpoint_dtype({"dtype": "float16"}) == "float16"  # transformers 5 writes `dtype`
    assert checkpoint_dtype({"text_config": {"torch_dtype": "bfloat16"}}) == "bfloat16"
    # llava-v1.6: the top level wins over text_config, as transformers' dtype="auto" does
    assert (
        checkpoint_dtype({"torch_dtype": "float16", "text_config": {"torch_dtype": "bfloat16"}}) == "float16"
    )
    # Qwen-VL-Chat: torch_dtype plus legacy flags, all false
    assert (
        checkpoint_dtype({"torch_dtype": "bfloat16", "bf16": False, "fp16": False, "fp32": False})
        == "bfloat16"
    )
    assert checkpoint_dtype({"torch_dtype": "bfloat16", "fp32": True}) == "float32"
    assert checkpoint_dtype({}) == "float32"


def test_float16_becomes_bfloat16_on_cpu_and_overrides_win(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert resolve_dtype("auto", tmp_path, "cpu", "llm") == "bfloat16"
    assert resolve_dtype("auto", tmp_path, "cuda:0", "llm") == "float16"
    assert resolve_dtype("float32", tmp_path, "cpu", "llm") == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", tmp_path, "cpu", "llm")


def vision_dtype(port: int) -> str:
    async def ask():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            return (await stub.GetModelInfo(vision_pb2.VisionModelInfoRequest(), timeout=10)).dtype

    return asyncio.run(ask())


def test_bf16_checkpoint_is_served_in_bf16_without_settings(tmp_path, image_dir):
    checkpoint = build_llava_checkpoint(tmp_path / "bf16-llava", dtype="bfloat16")
    assert checkpoint_dtype(json.loads((checkpoint / "config.json").read_text())) == "bfloat16"
    stack = Stack(checkpoint, tmp_path, ["--allowed-local-media-path", str(image_dir)], dtype=None).start()
    try:
        client = openai_client(stack)
        card = client.models.list().data[0]
        assert card.model_extra["dtype"] == "bfloat16"
        assert vision_dtype(stack.vision_port) == "bfloat16"
        reply = greedy_chat(client, "What is this?", [f"file://{image_dir / 'a.png'}"], max_tokens=4)
        assert reply.usage.completion_tokens == 4
    finally:
        stack.stop()
    assert "bfloat16 weights" in (tmp_path / "llm.log").read_text()


PEAK_SCRIPT = """
import json, sys
from llm_service.config import LLMConfig
from llm_service.models import load_language_model
def status_kb(key):
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))[key].split()[0])
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the imports are not what is measured
    f.write("5")
base, anon = status_kb("VmRSS"), status_kb("RssAnon")
model = load_language_model(LLMConfig(checkpoint=sys.argv[1], dtype=sys.argv[2]))
weights = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
print(json.dumps({"peak_kb": status_kb("VmHWM") - base, "anon_kb": status_kb("RssAnon") - anon,
                  "weights": weights, "dtype": str(model.dtype)}))
"""


def load_peak(checkpoint, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(checkpoint), dtype],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bf16_load_peak_is_half_of_float32(tmp_path):
    checkpoint = build_llava_checkpoint(tmp_path / "bf16-large", LARGE_TEXT, dtype="bfloat16")
    bf16, f32 = load_peak(checkpoint, "auto"), load_peak(checkpoint, "float32")
    print(f"LLM load peak: auto/bf16 {bf16}, float32 {f32}")
    assert (bf16["dtype"], f32["dtype"]) == ("torch.bfloat16", "torch.float32")
    assert f32["weights"] == 2 * bf16["weights"] > 200e6
    assert 0.35 < bf16["peak_kb"] / f32["peak_kb"] < 0.65
    # What stays private to the process grows by the weights once, not twice, between the two (the
    # peak also counts the safetensors file's mmapped page cache, which the kernel can reclaim).
    assert f32["anon_kb"] - bf16["anon_kb"] < 1.4 * (f32["weights"] - bf16["weights"]) / 1024


def test_tied_embeddings_stay_one_tensor_through_a_cast(tmp_path):
    """Qwen2-VL-2B ties lm_head to the embeddings: casting its bf16 checkpoint to float32 must not
    split them into two copies (one Parameter each, cast separately)."""
    from llm_service.config import LLMConfig
    from llm_service.models import load_language_model
    from tests.checkpoints.hub import build_from_hub

    checkpoint = build_from_hub("qwen2_vl_2b", tmp_path / "q2b")
    model = load_language_model(LLMConfig(checkpoint=str(checkpoint), dtype="float32"))
    decoder = model.decoder
    assert decoder.lm_head.weight.dtype == torch.float32
    assert decoder.lm_head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()
