"""GPU checks of the LLM engine, for a lent H100/H200 (`bash benchmarks/gpu_check.sh`).

1. Parity on the GPU, tiny random-weight LLaVA checkpoint, 16 requests (text-only and with an image)
   sent at once, against transformers' `generate` on each request alone on the same GPU:
   - float32 (sdpa): token-identical, except at a near-tie (tests.reference.assert_greedy_close);
   - bfloat16 (every backend available): bf16 greedy output drifts from float32 within a few tokens on
     random weights, for transformers too, so the check is that ours drifts no sooner than theirs:
     the mean first divergence from transformers' float32 output, ours against transformers' bf16.
2. flash_attn against sdpa: the same bf16 numbers side by side.
3. Decode throughput of a LLaVA-1.5-7B-shaped language model (random weights, bf16) at 1, 16 and 64
   concurrent sequences, per backend and for the compiled sdpa decode step, against the
   memory-bandwidth floor: each decode step must read every weight and each sequence's KV once, so
   tok/s <= concurrency * bandwidth / bytes per step.

    python -m benchmarks.gpu_check [--device cuda] [--small]   (--small: tiny sizes, runs on CPU)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from llm_service.attention import flash_attn_available
from llm_service.engine import Engine, EngineConfig
from llm_service.models.base import LanguageModel
from llm_service.models.decoder import DecoderConfig, _rope_frequencies
from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams

# Peak HBM bandwidth by device name (bytes/s); the floor assumes all of it.
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
LLAVA_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
)


def decoder_config(**shape) -> DecoderConfig:
    class _Rope:  # what _rope_frequencies reads from a transformers config
        rope_theta = 10000.0

    inv_freq, scaling = _rope_frequencies(_Rope, {"rope_theta": 10000.0}, shape["head_dim"])
    return DecoderConfig(
        rms_norm_eps=1e-5,
        qkv_bias=False,
        inv_freq=inv_freq,
        rope_scaling=scaling,
        max_position_embeddings=4096,
        **shape,
    )


async def run_requests(
    engine: Engine, requests: list[GenerateRequest]
) -> list[tuple[list[int], float, float]]:
    """(token ids, first-token time, finish time) per request, all submitted at once."""

    async def one(request):
        ids, first = [], None
        async for out in engine.generate(request):
            ids.extend(out.token_ids)
            first = first or time.perf_counter()
        return ids, first, time.perf_counter()

    return await asyncio.gather(*(one(r) for r in requests))


PARITY_STEPS = 16


def reference_cases(folder: Path, device: str, dtype) -> tuple[list, list[GenerateRequest]]:
    """transformers' greedy tokens and logprobs on 16 requests (every other one with an image), and the
    same requests for our engine (image embeddings computed by transformers' own tower)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tests.helpers import make_image
    from tests.reference import greedy_with_logprobs

    processor = AutoProcessor.from_pretrained(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    hf = hf.to(device).eval()  # type: ignore[arg-type]
    cases, requests = [], []
    for i in range(16):
        images = [Image.open(io.BytesIO(make_image(60 + i, 50, seed=i))).convert("RGB")] * (i % 2)
        text = "describe the picture " * (1 + i % 5)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(text=prompt, images=images or None, return_tensors="pt").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        expected, logprobs = greedy_with_logprobs(hf, inputs, PARITY_STEPS)
        ids = inputs["input_ids"][0].tolist()
        spans = []
        if images:
            with torch.inference_mode():
                feats = hf.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
            spans.append(ImageSpan(ids.index(hf.config.image_token_id), feats.cpu(), f"img{i}"))
        sampling = SamplingParams(temperature=0, max_new_tokens=PARITY_STEPS, ignore_eos=True)
        requests.append(GenerateRequest(f"r{i}", ids, spans, sampling))
        cases.append((expected, logprobs.cpu()))
    return cases, requests


def our_tokens(folder: Path, device: str, dtype, backend: str, requests) -> list[list[int]]:
    from llm_service.models.llava import LlavaLanguageModel

    model = LlavaLanguageModel(str(folder), dtype, device)
    engine = Engine(model, EngineConfig(attention_backend=backend, kv_cache_bytes=1 << 28, compile="off"))
    try:
        return [r[0] for r in asyncio.run(run_requests(engine, requests))]
    finally:
        engine.stop()


def first_divergence(a, b) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), PARITY_STEPS)


def parity(device: str, backends: list[str], report: dict) -> bool:
    from tests.reference import assert_greedy_close
    from tools.checkpoints import build_llava_checkpoint

    folder = Path(tempfile.mkdtemp()) / "tiny-llava"
    build_llava_checkpoint(folder, seed=0)
    ok = True
    f32_cases, f32_requests = reference_cases(folder, device, torch.float32)
    try:
        ours = our_tokens(folder, device, torch.float32, "sdpa", f32_requests)
        for i, (tokens, (expected, logprobs)) in enumerate(zip(ours, f32_cases, strict=True)):
            assert_greedy_close(tokens, expected, logprobs, f"request {i}")
        print("parity float32 [sdpa]: every request equals transformers (near-ties allowed)")
        report["parity_float32"] = "pass"
    except AssertionError as exc:
        ok = False
        print(f"parity float32 [sdpa]: FAILED: {exc}")
        report["parity_float32"] = str(exc)
    truth = [c[0] for c in f32_cases]
    bf16_cases, bf16_requests = reference_cases(folder, device, torch.bfloat16)
    theirs = sum(first_divergence(c[0], t) for c, t in zip(bf16_cases, truth, strict=True)) / len(truth)
    print(f"bf16: transformers' first divergence from float32 at token {theirs:.1f} on average")
    report["bf16_first_divergence_transformers"] = theirs
    for backend in backends:
        ours = our_tokens(folder, device, torch.bfloat16, backend, bf16_requests)
        mine = sum(first_divergence(o, t) for o, t in zip(ours, truth, strict=True)) / len(truth)
        good = mine >= 0.5 * theirs
        ok &= good
        verdict = "ok" if good else "FAILED: drifts much sooner"
        print(f"bf16 [{backend}]: ours at token {mine:.1f} on average ({verdict})")
        report[f"bf16_first_divergence_{backend}"] = mine
    return ok


def throughput(device: str, backends: list[str], small: bool, report: dict) -> None:
    shape = (
        dict(LLAVA_7B)
        if not small
        else dict(
            LLAVA_7B,
            hidden_size=256,
            intermediate_size=512,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            head_dim=64,
        )
    )
    config = decoder_config(**shape)
    model = LanguageModel.random(config, device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.decoder.parameters())
    weight_bytes -= model.decoder.embed_tokens.weight.numel() * 2  # only the used rows are read
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    bandwidth = next((bw for key, bw in BANDWIDTH.items() if key in name), None)
    prompt_len, new_tokens = 64, 128 if not small else 16
    # each backend eager, and the sdpa backend's compiled decode step (llm_service/engine/compiled_decode.py;
    # inductor's default mode: fused kernels, no captured graphs yet)
    legs = [(backend, "off", backend) for backend in backends] + [("sdpa", "on", "sdpa+compile")]
    for backend, compile_mode, label in legs:
        engine = Engine(model, EngineConfig(attention_backend=backend, max_running=64, compile=compile_mode))
        for concurrency in (1, 16, 64):
            requests = [
                GenerateRequest(
                    f"t{label}{concurrency}-{i}",
                    torch.randint(0, config.vocab_size, (prompt_len,)).tolist(),
                    [],
                    SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True),
                )
                for i in range(concurrency)
            ]
            asyncio.run(run_requests(engine, requests[:1]))  # warm-up
            results = asyncio.run(run_requests(engine, requests))
            start = max(r[1] for r in results)  # every sequence is decoding from here on
            end = min(r[2] for r in results)
            steps = new_tokens - 1
            tok_s = (
                concurrency * steps / max(end - start, 1e-9)
                if concurrency > 1
                else steps / (results[0][2] - results[0][1])
            )
            line = f"decode [{label}] concurrency {concurrency:3d}: {tok_s:9.1f} tok/s"
            entry = {"tok_s": tok_s}
            if bandwidth:
                context = prompt_len + new_tokens / 2
                step_bytes = weight_bytes + concurrency * context * kv_per_token
                floor = concurrency * bandwidth / step_bytes
                entry["bandwidth_floor_tok_s"] = floor
                line += f"   floor {floor:9.1f} tok/s   ({tok_s / floor:.0%} of the floor)"
            report[f"decode_{label}_{concurrency}"] = entry
            print(line)
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU dry run of the script)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    backends = ["sdpa"] + (["flash_attn"] if flash_attn_available(torch.device(args.device)) else [])
    print(f"device {args.device}: backends {backends}; torch {torch.__version__}")
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name())
    report: dict = {"backends": backends}
    ok = parity(args.device, backends, report)
    throughput(args.device, backends, args.small, report)
    Path(args.out).write_text(json.dumps(report, indent=2))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
