"""The peer benchmark's report: each server's runs, mmserve / vLLM ratios against issue #14's targets,
how far the two servers' greedy tokens agree, and responses without exactly the asked token count."""

from __future__ import annotations

import statistics

from benchmarks.engine_measure import RunResult
from benchmarks.engine_report import table

SERVERS = ("mmserve", "vllm")
# (label, run, summary key, target on mmserve / vLLM or None, higher is better)
RATIOS: tuple[tuple[str, str, str, float | None, bool], ...] = (
    ("32 at once, cold: output tok/s", "cold", "output_tok_per_s", 1.15, True),
    ("32 at once, cold: TTFT p50", "cold", "ttft_p50_s", 0.8, False),
    ("32 at once, cold: TTFT p99", "cold", "ttft_p99_s", None, False),
    ("32 at once, warm (2nd pass): output tok/s", "warm", "output_tok_per_s", None, True),
    ("32 at once, warm (2nd pass): TTFT p50", "warm", "ttft_p50_s", None, False),
    ("one at a time: time per output token (p50)", "single", "tpot_p50_s", 1.0, False),
    ("one at a time: TTFT p50", "single", "ttft_p50_s", 1.0, False),
)
REPEAT_TARGET = 0.3  # mmserve: TTFT of a repeated image with new text / TTFT of a new image


def print_runs(runs: dict[str, dict[str, RunResult]]) -> None:
    for server in SERVERS:
        if server in runs:
            print(f"\n{server}:")
            print(table({name: run.summary() for name, run in runs[server].items()}))


def ratios(summaries: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Prints and returns mmserve / vLLM for each RATIOS row, and each server's repeat / new TTFT."""
    out: dict[str, dict] = {}
    print(f"\n  {'mmserve / vLLM':52s} {'mmserve':>9s} {'vLLM':>9s} {'ratio':>7s}")
    for label, run, key, target, higher in RATIOS:
        mm, vl = summaries["mmserve"][run][key], summaries["vllm"][run][key]
        ratio = mm / vl
        verdict = ""
        if target is not None:
            met = ratio >= target if higher else ratio <= target
            verdict = f"  (target {'>=' if higher else '<='} {target}: {'met' if met else 'NOT met'})"
        unit = "tok/s" if higher else "s"
        print(f"  {label:52s} {mm:9.3f} {vl:9.3f} {ratio:6.2f}x [{unit}]{verdict}")
        out[f"{run}.{key}"] = {"mmserve": mm, "vllm": vl, "ratio": ratio, "target": target}
    for server in SERVERS:
        new, repeat = (summaries[server][r]["ttft_p50_s"] for r in ("new_image", "repeat_image"))
        met = "met" if repeat / new <= REPEAT_TARGET else "NOT met"
        print(
            f"  {server}: TTFT p50 repeated image + new text {repeat * 1000:.0f} ms / new image "
            f"{new * 1000:.0f} ms = {repeat / new:.2f}x"
            + (f"  (target <= {REPEAT_TARGET}: {met})" if server == "mmserve" else "")
        )
        out[f"{server}.repeat_over_new_ttft"] = {"new": new, "repeat": repeat, "ratio": repeat / new}
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(runs: dict[str, dict[str, RunResult]], max_tokens: int) -> dict[str, dict]:
    """Greedy tokens of mmserve against vLLM, request by request, for the cold and single runs. Both
    compute in bf16 with different kernels, so near-tied logits of the random weights can break
    differently; the common prefix says how long they agree, not only whether they all do."""
    out = {}
    for run in ("cold", "single"):
        pairs = list(zip(runs["mmserve"][run].requests, runs["vllm"][run].requests, strict=True))
        prefixes = [common_prefix(a.token_ids, b.token_ids) for a, b in pairs]
        out[run] = {
            "same_prompt_tokens": sum(a.prompt_tokens == b.prompt_tokens for a, b in pairs),
            "common_prefix": prefixes,
            "all_equal": sum(p == max_tokens for p in prefixes),
            "first_equal": sum(p >= 1 for p in prefixes),
        }
        print(
            f"  greedy tokens, {run} run: first token equal {out[run]['first_equal']}/{len(prefixes)}, all "
            f"{max_tokens} equal {out[run]['all_equal']}/{len(prefixes)}; common prefix min "
            f"{min(prefixes)} / median {statistics.median(prefixes):.0f} / max {max(prefixes)} tokens "
            f"(same prompt token count {out[run]['same_prompt_tokens']}/{len(pairs)})"
        )
    return out


def token_count_failures(runs: dict[str, dict[str, RunResult]], max_tokens: int) -> list[str]:
    """Every response of a full-length run must stream exactly max_tokens token ids, which also means
    the server echoed them (return_token_ids), so that the agreement check compares real ids."""
    failures = []
    for server, server_runs in runs.items():
        for name, run in server_runs.items():
            for i, r in enumerate(run.requests):
                ids_ok = len(r.token_ids) == max_tokens and -1 not in r.token_ids
                if r.error or not ids_ok or r.completion_tokens != max_tokens:
                    got = f"{r.completion_tokens} completion tokens (usage), {len(r.token_ids)} ids streamed"
                    failures.append(f"{server} {name} request {i}: {r.error or got}")
    return failures
