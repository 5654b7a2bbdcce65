"""Vision service benchmark (issue: vision at scale).

1. Throughput: N requests sent at once, each one distinct 336x336 image, on the anchor checkpoint
   (LLaVA-1.5-shaped, random weights, bfloat16): images/s of the vision service through gRPC
   (preprocessing included), for the thread and the process preprocessing pool, against
   transformers' processor + get_image_features called one image at a time, in the same run.
2. TTFT through the whole stack of a request that repeats an earlier image with new text, against
   one with a new image.

    python -m benchmarks.bench_vision [--images 64] [--ttft-pairs 8]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image

from mmserve.grpc_util import channel_options
from mmserve.images import content_hash
from mmserve.proto import vision_pb2, vision_pb2_grpc
from tests.helpers import ROOT, Stack, data_url, free_ports
from tools.checkpoints import ANCHOR_SHAPE, build_llava_checkpoint

DTYPE = "bfloat16"
# Service configurations measured against the same baseline in one run.
CONFIGS = {
    "threads (default)": ["--preprocess-mode", "thread"],
    "processes": ["--preprocess-mode", "process"],
    "threads+compile": ["--preprocess-mode", "thread", "--compile"],
}


def anchor_checkpoint() -> Path:
    home = Path(os.environ.get("MMSERVE_HOME", Path.home() / ".cache" / "mmserve"))
    path = home / "bench-anchor-llava"
    if not (path / "mmserve_demo.json").is_file():
        build_llava_checkpoint(path, ANCHOR_SHAPE, seed=0, dtype=DTYPE)
    return path


def photo_like(seed: int, size: int = 336) -> bytes:
    """A JPEG with smooth structure and noise (closer to a photo than pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], -1) * 90 + 128
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def baseline_images_per_s(checkpoint: Path, images: list[bytes]) -> float:
    """transformers' processor + get_image_features, one image at a time, same dtype."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=getattr(torch, DTYPE)).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)

    def one(data: bytes):
        pixels = processor.image_processor(
            images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt"
        )
        with torch.inference_mode():
            return model.model.get_image_features(pixels["pixel_values"].to(model.dtype)).pooler_output[0]

    one(images[0])  # warm-up
    started = time.perf_counter()
    for data in images:
        one(data)
    return len(images) / (time.perf_counter() - started)


def start_vision(checkpoint: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, str, int]:
    port, metrics = free_ports(2)
    args = ["--checkpoint", str(checkpoint), "--port", str(port), "--dtype", DTYPE, *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vision_service", *args, "--metrics-port", str(metrics)],
        cwd=ROOT,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=300)
    return proc, address, metrics


async def service_images_per_s(address: str, images: list[bytes]) -> float:
    async with grpc.aio.insecure_channel(address, options=channel_options(256 << 20)) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)

        def request(data):
            return vision_pb2.EmbedRequest(
                images=[vision_pb2.ImageInput(data=data, content_hash=content_hash(data))]
            )

        for data in (photo_like(10_000), photo_like(10_001)):  # warm-up, not part of the measured set
            await stub.Embed(request(data))
        started = time.perf_counter()
        await asyncio.gather(*(stub.Embed(request(data)) for data in images))
        return len(images) / (time.perf_counter() - started)


def mean_batch(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    values = dict(
        line.split()[:2] for line in text.splitlines() if line.startswith("mmserve_vision_batch_size_")
    )
    return float(values["mmserve_vision_batch_size_sum"]) / float(values["mmserve_vision_batch_size_count"])


def ttft(base_url: str, model: str, image: bytes, text: str) -> float:
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image, "image/jpeg")}},
                    {"type": "text", "text": text},
                ],
            }
        ],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 2:  # the first chunk only carries the role; the second carries the first token
                return time.perf_counter() - started
    raise RuntimeError("no token came back")


def measure_throughput(checkpoint: Path, images: list[bytes], logs: Path) -> dict:
    """Images/s of each service configuration, and of the transformers baseline before and after them."""
    results: dict = {}
    baseline_runs = [baseline_images_per_s(checkpoint, images)]
    for name, extra in CONFIGS.items():
        proc, address, metrics = start_vision(checkpoint, extra, logs / f"vision-{name}.log")
        try:
            results[f"service_{name}_images_per_s"] = asyncio.run(service_images_per_s(address, images))
            results[f"service_{name}_mean_batch"] = mean_batch(metrics)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    # The baseline again after the services: this machine is noisy, so the ratio uses its faster run.
    baseline_runs.append(baseline_images_per_s(checkpoint, images))
    results["hf_one_at_a_time_runs_images_per_s"] = baseline_runs
    results["hf_one_at_a_time_images_per_s"] = max(baseline_runs)
    return results


def measure_ttft(checkpoint: Path, logs: Path, pairs: int) -> dict:
    """TTFT through the whole stack of a new image, then of the same image with new text."""
    stack = Stack(checkpoint, logs, ["--model-name", "anchor"]).start()
    try:
        new, repeat = [], []
        for i in range(pairs):
            image = photo_like(20_000 + i)
            new.append(ttft(stack.base_url, "anchor", image, f"What is in picture {i}?"))
            repeat.append(ttft(stack.base_url, "anchor", image, f"Describe the colours of picture {i}."))
        # Where a repeat's time goes: the LLM's own submit-to-first-token (prefill), per request.
        llm_ttft = stack.llm_metric("mmserve_llm_ttft_seconds_sum") / stack.llm_metric(
            "mmserve_llm_ttft_seconds_count"
        )
        encode = stack.vision_metric("mmserve_vision_encode_seconds_sum") / stack.vision_metric(
            "mmserve_vision_encode_seconds_count"
        )
    finally:
        stack.stop()
    return {
        "llm_prefill_mean_s": llm_ttft,
        "vision_encode_mean_s": encode,
        "ttft_new_image_p50_s": statistics.median(new),
        "ttft_repeat_image_p50_s": statistics.median(repeat),
    }


def report(results: dict, pairs: int) -> None:
    base = results["hf_one_at_a_time_images_per_s"]
    print(
        f"\nVision throughput, {results['images']} distinct 336x336 JPEGs sent at once, {DTYPE}, {os.cpu_count()} CPUs"
    )
    runs = ", ".join(f"{r:.1f}" for r in results["hf_one_at_a_time_runs_images_per_s"])
    print(
        f"  HF processor + get_image_features, one at a time: {base:7.1f} images/s   1.00x  (best of {runs})"
    )
    for name in CONFIGS:
        rate = results[f"service_{name}_images_per_s"]
        mean = results[f"service_{name}_mean_batch"]
        print(
            f"  vision service over gRPC, {name:17s}: {rate:7.1f} images/s   {rate / base:.2f}x  (mean batch {mean:.1f})"
        )
    ratio = results["ttft_repeat_image_p50_s"] / results["ttft_new_image_p50_s"]
    print(
        f"\nTTFT p50 through the stack ({pairs} pairs): new image {results['ttft_new_image_p50_s'] * 1000:.0f} ms, "
        f"repeated image + new text {results['ttft_repeat_image_p50_s'] * 1000:.0f} ms  ({ratio:.2f}x)"
    )
    print(
        f"  of which: LLM prefill (submit to first token) {results['llm_prefill_mean_s'] * 1000:.0f} ms mean, "
        f"vision encode of a new image {results['vision_encode_mean_s'] * 1000:.0f} ms mean"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--ttft-pairs", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision.json"))
    args = parser.parse_args()
    checkpoint = anchor_checkpoint()
    images = [photo_like(i) for i in range(args.images)]
    logs = Path(args.out).parent
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {"images": args.images, "dtype": DTYPE, "cpus": os.cpu_count()}
    results |= measure_throughput(checkpoint, images, logs)
    results |= measure_ttft(checkpoint, logs, args.ttft_pairs)
    report(results, args.ttft_pairs)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
