"""LLM engine benchmark (issue: continuous batching with a paged KV cache).

The anchor workload: the anchor checkpoint (LLaVA-1.5-shaped, random weights, bfloat16), N requests
(32) each with one distinct 336x336 image and a short question (~21 text tokens), exactly M (64)
greedy output tokens each (`ignore_eos`), all sent at once to the real three-process stack through
the gateway with the official `openai` client, streaming. Measured: output tok/s, req/s, TTFT p50/p99
(send -> first token chunk), TPOT p50 (per request (last token - first token) / (tokens - 1), then the
median); and a single-stream run (requests one at a time, fresh images) -> single-stream tok/s.

Baselines in the same run, same checkpoint, inputs and dtype, torch threads = all cores, both timed
from the JPEG bytes (decode + processor + generate), with a streamer that timestamps every token:
  - HF sequential: `LlavaForConditionalGeneration.generate`, one request at a time;
  - HF static batch: one `generate` over all N requests, left-padded.

    python -m benchmarks.bench_engine [--requests 32] [--max-tokens 64] [--single-requests 4]
        [--skip-hf] [--llm-args "--max-running 64"]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.bench_vision import anchor_checkpoint
from benchmarks.engine_hf import HFBaseline
from benchmarks.engine_measure import SINGLE_SEED, OtherLoad, RunResult, Workload
from benchmarks.engine_mmserve import bench_stack, llm_metric_lines, mmserve_runs
from benchmarks.engine_report import (
    print_agreement,
    print_failures,
    print_machine,
    print_ratios,
    print_workload,
    run_names,
    table,
    token_count_failures,
)
from tests.helpers import ROOT

DTYPE = "bfloat16"  # the anchor workload; --dtype float32 only to tell numerics from bugs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=4)
    parser.add_argument("--skip-hf", action="store_true", help="mmserve only (quick iteration)")
    parser.add_argument("--llm-args", default="", help='extra llm_service flags, e.g. "--max-running 64"')
    parser.add_argument("--dtype", default=DTYPE, choices=["bfloat16", "float32"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    return parser.parse_args()


def workloads(requests: int, single_requests: int) -> tuple[Workload, Workload]:
    """The measured requests, and the single-stream ones: the first questions again, with images no
    other run has sent."""
    work = Workload.make(requests, 0)
    single = Workload(Workload.make(single_requests, SINGLE_SEED).images, work.texts[:single_requests])
    return work, single


def run_hf(
    checkpoint: Path, args: argparse.Namespace, work: Workload, runs: dict[str, RunResult]
) -> dict | None:
    """The HF baselines into `runs`; returns the other processes' load meanwhile."""
    other = OtherLoad()
    hf = HFBaseline(checkpoint, args.dtype)
    hf.warm_up()
    runs["hf_sequential"] = hf.sequential(work, args.max_tokens)
    print(f"HF sequential done ({runs['hf_sequential'].wall_s:.1f} s)", flush=True)
    runs["hf_static_batch"] = hf.static_batch(work, args.max_tokens)
    print(f"HF static batch done ({runs['hf_static_batch'].wall_s:.1f} s)", flush=True)
    del hf
    gc.collect()
    return other.stop()


def run_mmserve(
    checkpoint: Path,
    logs: Path,
    args: argparse.Namespace,
    llm_args: list[str],
    work: tuple[Workload, Workload],
    runs: dict[str, RunResult],
) -> tuple[dict | None, list[str]]:
    """The mmserve runs into `runs`, on a stack started for them; returns the other processes' load
    meanwhile and the LLM service's engine metrics after the runs."""
    other = OtherLoad()
    stack = bench_stack(checkpoint, logs, args.dtype, llm_args).start()
    try:
        runs["mmserve"], runs["mmserve_single"] = asyncio.run(
            mmserve_runs(stack.base_url, *work, args.max_tokens)
        )
        metric_lines = llm_metric_lines(stack.llm_metrics_port)
    finally:
        stack.stop()
    return other.stop(), metric_lines  # after stop(): the services are reaped, their CPU time counted


def report(
    args: argparse.Namespace, results: dict, runs: dict[str, RunResult], metric_lines: list[str]
) -> None:
    """Prints the report, adding the comparisons with the HF baselines to `results`."""
    summaries = results["runs"]
    results.update(print_workload(args, results["llm_args"], results["cpus"], runs))
    names = run_names(args)
    print(table({names[key]: summaries[key] for key in runs}))
    if "hf_sequential" in runs:
        results["ratios"] = print_ratios(summaries)
        results["outputs_equal_to_hf_sequential"] = print_agreement(args, runs)
    print_failures(args, results["failures"])
    print_machine(metric_lines, results["other_processes"])


def main() -> None:
    args = parse_args()
    llm_args = shlex.split(args.llm_args)
    started = time.perf_counter()
    checkpoint = anchor_checkpoint()
    work = workloads(args.requests, args.single_requests)
    out = Path(args.out)
    logs = out.parent / "engine-logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": date.today().isoformat(),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "single_requests": args.single_requests,
        "dtype": args.dtype,
        "cpus": os.cpu_count(),
        "llm_args": llm_args,
    }
    runs: dict[str, RunResult] = {}
    load: dict[str, dict | None] = {}
    if not args.skip_hf:  # first, so that the idle services do not share the machine with it
        load["hf"] = run_hf(checkpoint, args, work[0], runs)
    load["mmserve"], metric_lines = run_mmserve(checkpoint, logs, args, llm_args, work, runs)
    results["total_s"] = time.perf_counter() - started
    results["other_processes"] = load
    results["runs"] = {key: run.summary() for key, run in runs.items()}
    results["llm_metrics"] = metric_lines
    results["failures"] = token_count_failures(runs, args.max_tokens)

    report(args, results, runs, metric_lines)
    print(f"\ntotal benchmark time {results['total_s']:.0f} s")
    out.write_text(json.dumps(results, indent=2))
    print(f"results written to {out}; service logs in {logs}")
    if results["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
