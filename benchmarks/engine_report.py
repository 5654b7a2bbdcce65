"""The engine benchmark's report: the table of runs, mmserve against the HF baselines (ratios to the
issue's targets, greedy outputs equal), token-count failures, engine metrics and other processes' load."""

from __future__ import annotations

import argparse
import shlex

from benchmarks.engine_measure import RunResult

# Targets of the issue (mmserve against the same-run HF baselines).
TARGETS = {"throughput": 1.6, "ttft": 0.5, "single": 1.1}


def table(rows: dict[str, dict]) -> str:
    head = f"  {'':28s} {'out tok/s':>10s} {'req/s':>7s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s}"
    lines = [head]
    for name, s in rows.items():
        lines.append(
            f"  {name:28s} {s['output_tok_per_s']:10.1f} {s['req_per_s']:7.2f} "
            f"{s['ttft_p50_s'] * 1000:7.0f}ms {s['ttft_p99_s'] * 1000:7.0f}ms {s['tpot_p50_s'] * 1000:7.1f}ms"
        )
    return "\n".join(lines)


def ratio_line(label: str, value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"  {label:52s} {value:5.2f}x  (target {sign} {target}: {'met' if met else 'NOT met'})"


def run_names(args: argparse.Namespace) -> dict[str, str]:
    """The table's name of each run, by its key in `runs`."""
    return {
        "hf_sequential": "HF sequential",
        "hf_static_batch": f"HF static batch {args.requests}",
        "mmserve": f"mmserve ({args.requests} at once)",
        "mmserve_single": f"mmserve single stream ({args.single_requests})",
    }


def token_count_failures(runs: dict[str, RunResult], max_tokens: int) -> list[str]:
    """Every mmserve response must carry exactly max_tokens completion tokens (usage and stream)."""
    return [
        f"{key} request {i}: {r.error or f'{r.completion_tokens} completion tokens (usage), {len(r.token_times)} streamed'}"
        for key in ("mmserve", "mmserve_single")
        for i, r in enumerate(runs[key].requests)
        if r.error or r.completion_tokens != max_tokens or len(r.token_times) != max_tokens
    ]


def print_workload(
    args: argparse.Namespace, llm_args: list[str], cpus: int | None, runs: dict[str, RunResult]
) -> dict:
    """The header and the prompt token counts; with the HF runs, the largest per-request difference."""
    print(
        f"\nLLM engine, anchor checkpoint ({args.dtype}, {cpus} CPUs): {args.requests} requests, one distinct "
        f"336x336 image + a short question each, {args.max_tokens} greedy output tokens (ignore_eos)"
    )
    print(f"  llm_service extra args: {shlex.join(llm_args) or '(none: service defaults)'}")
    mm_prompt = [r.prompt_tokens for r in runs["mmserve"].requests if r.prompt_tokens is not None]
    if mm_prompt:
        print(f"  prompt tokens, mmserve (usage): {min(mm_prompt)}-{max(mm_prompt)}", end="")
    if "hf_sequential" not in runs:
        print()
        return {}
    hf_prompt = [r.prompt_tokens or 0 for r in runs["hf_sequential"].requests]
    mm_all = [r.prompt_tokens for r in runs["mmserve"].requests]
    worst = max((abs(a - b) for a, b in zip(hf_prompt, mm_all, strict=True) if b is not None), default=-1)
    print(f"; HF processor: {min(hf_prompt)}-{max(hf_prompt)} (largest per-request difference {worst})")
    return {"prompt_token_max_difference": worst}


def print_ratios(summaries: dict[str, dict]) -> dict[str, float]:
    """mmserve against the HF baselines, each ratio against the issue's target."""
    mm, single_s = summaries["mmserve"], summaries["mmserve_single"]
    static, seq = summaries["hf_static_batch"], summaries["hf_sequential"]
    ratios = {
        "throughput": mm["output_tok_per_s"] / static["output_tok_per_s"],
        "ttft": mm["ttft_p50_s"] / static["ttft_p50_s"],
        "single": single_s["output_tok_per_s"] / seq["output_tok_per_s"],
    }
    print(
        ratio_line("mmserve tok/s / HF static batch tok/s", ratios["throughput"], TARGETS["throughput"], True)
    )
    print(ratio_line("mmserve TTFT p50 / HF static batch TTFT p50", ratios["ttft"], TARGETS["ttft"], False))
    print(
        ratio_line(
            "mmserve single-stream tok/s / HF sequential tok/s", ratios["single"], TARGETS["single"], True
        )
    )
    return ratios


def print_agreement(args: argparse.Namespace, runs: dict[str, RunResult]) -> dict[str, dict]:
    """Informational: greedy outputs of the same checkpoint in bf16. Kernels and batch shapes differ,
    so near-tied logits of the random weights break differently; HF static batch against HF
    sequential shows how much of that is normal."""
    names = run_names(args)
    reference = [r.token_ids for r in runs["hf_sequential"].requests]
    agreement = {}
    for key in ("hf_static_batch", "mmserve"):
        ids = [r.token_ids for r in runs[key].requests]
        agreement[key] = {
            "first_token": sum(a[:1] == b[:1] for a, b in zip(reference, ids, strict=True)),
            "all_tokens": sum(a == b for a, b in zip(reference, ids, strict=True)),
        }
        print(
            f"  outputs equal to HF sequential, {names[key]}: first token "
            f"{agreement[key]['first_token']}/{args.requests}, all {args.max_tokens} tokens "
            f"{agreement[key]['all_tokens']}/{args.requests}"
        )
    return agreement


def print_failures(args: argparse.Namespace, failures: list[str]) -> None:
    if failures:
        print(f"\n{len(failures)} mmserve responses without exactly {args.max_tokens} tokens:")
        for line in failures[:20]:
            print("  " + line)
    else:
        n = args.requests + args.single_requests
        print(f"  all {n} mmserve responses: exactly {args.max_tokens} completion tokens (usage and stream)")


def print_machine(metric_lines: list[str], load: dict[str, dict | None]) -> None:
    """The LLM service's cache / preemption / KV metrics, and how busy other processes kept the CPUs."""
    if metric_lines:
        print("\nLLM service metrics (cache / preemption / KV):")
        for line in metric_lines:
            print("  " + line)
    for phase, share in load.items():
        if share is not None:
            flag = "  <- the machine was shared: numbers skewed" if share["other_share"] > 0.05 else ""
            print(
                f"  other processes used {share['other_share']:.0%} of the CPUs during the {phase} phase "
                f"({share['other_cpu_s']:.0f} core-s){flag}"
            )
