"""Where the time goes (issue #14): py-spy samples every process of the stack while the peer
benchmark's workload runs, and the samples are summed into a table by what the code was doing.

Two phases on the anchor checkpoint (bf16, caches off as in the cold run): one request at a time
(`--single` requests, `--max-tokens` greedy tokens each: the decode step at batch 1), then
`--requests` at once (the TTFT at 32). py-spy samples only running threads (not ones blocked in
a wait), so a row is CPU time; it is reported as ms per output token (single) and as seconds of the
phase (at once), per process. Each sample is put in the first category its innermost frame of ours
(or of grpc/uvicorn/torch's module code) falls in, walking from the leaf to the root.

    python -m benchmarks.profile_stack [--single 4] [--requests 32] [--max-tokens 64] [--rate 250]

Needs py-spy (the `bench` extra) and ptrace rights over the services (root, or ptrace_scope 0).
Collapsed stacks go to benchmarks/results/profile-<phase>-<process>.txt for a flame graph
(e.g. speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_vision import anchor_checkpoint
from benchmarks.engine_measure import SINGLE_SEED, RunResult, Workload
from benchmarks.engine_mmserve import bench_stack
from benchmarks.peer_runs import one_by_one, openai_client, together, warm_up
from tests.helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"
CACHES_OFF_LLM = ["--disable-prefix-caching"]
CACHES_OFF_VISION = ["--cache-bytes", "0"]

# (category, predicate on (file, function)); the first frame (leaf -> root) any rule claims decides.
Rule = tuple[str, str, str]  # category, path fragment, function name ("" = any)
RULES: tuple[Rule, ...] = (
    ("sampler", "llm_service/sampler.py", ""),
    ("attention metadata (step inputs)", "llm_service/attention/", "metadata"),
    ("attention metadata (step inputs)", "llm_service/attention/", "_build"),
    ("model forward: attention", "llm_service/attention/", ""),
    ("model forward: lm_head", "llm_service/models/decoder.py", "logits"),
    ("model forward: linear/conv (mmserve.half_cpu)", "mmserve/half_cpu.py", ""),
    ("model forward: layers", "llm_service/models/", ""),
    ("model forward: layers", "torch/nn/modules/", ""),
    ("step inputs (ids, embeddings, positions)", "llm_service/engine/model_runner.py", ""),
    ("scheduler + block manager", "llm_service/engine/scheduler.py", ""),
    ("scheduler + block manager", "llm_service/engine/block_manager.py", ""),
    ("scheduler + block manager", "llm_service/engine/sequence.py", ""),
    ("engine output loop + stats", "llm_service/engine/", ""),
    ("engine output loop + stats", "llm_service/metrics.py", ""),
    ("request admission (validate, image keys)", "llm_service/engine/validation.py", ""),
    ("wire: tensors <-> protobuf", "mmserve/tensor_codec.py", ""),
    ("wire: tensors <-> protobuf", "mmserve/wire_pb.py", ""),
    ("gateway: detokenize", "gateway/detok", ""),
    ("gateway: detokenize", "tokenizers/", ""),
    ("gateway: detokenize", "transformers/tokenization", ""),
    ("images: fetch, decode (PIL)", "gateway/images", ""),
    ("images: fetch, decode (PIL)", "PIL/", ""),
    ("gateway: SSE + OpenAI shapes", "gateway/", ""),
    ("vision: encoder forward", "vision_service/", "encode"),
    ("vision: service", "vision_service/", ""),
    ("gRPC (python side)", "grpc/", ""),
    ("HTTP server (uvicorn/starlette/fastapi)", "uvicorn/", ""),
    ("HTTP server (uvicorn/starlette/fastapi)", "starlette/", ""),
    ("HTTP server (uvicorn/starlette/fastapi)", "fastapi/", ""),
    ("HTTP server (uvicorn/starlette/fastapi)", "pydantic", ""),
    ("asyncio event loop", "asyncio/", ""),
    ("mmserve (other)", "mmserve/", ""),
)


def categorize(stack: list[tuple[str, str]]) -> str:
    """`stack`: (function, file) from root to leaf."""
    for function, file in reversed(stack):
        for category, fragment, name in RULES:
            if fragment in file and (not name or name in function):
                return category
    return "other (torch internals outside a module, threads, native)"


def parse_frame(frame: str) -> tuple[str, str]:
    """py-spy's raw frame `function (file:line)` -> (function, file)."""
    function, _, rest = frame.partition(" (")
    return function, rest.rsplit(":", 1)[0]


def summarize(raw: Path, rate: int) -> dict[str, float]:
    """CPU seconds per category from py-spy's collapsed stacks (`frames... count` per line)."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text:
            continue
        frames = [parse_frame(f) for f in stack_text.split(";") if not f.startswith(("thread (", "process "))]
        seconds[categorize(frames)] += int(count) / rate
    return dict(seconds)


class Sampler:
    """py-spy record on each process, stopped with SIGINT (it then writes its output)."""

    def __init__(self, pids: dict[str, int], out: Path, rate: int):
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.files = {name: out / f"{name}.txt" for name in pids}
        self.procs = [
            subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
                + ["--output", str(self.files[name]), "--nonblocking", "--threads"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name, pid in pids.items()
        ]
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode not in (0, -signal.SIGINT):
                print(err.decode()[-2000:], file=sys.stderr)


def profile_phase(
    name: str, pids: dict[str, int], rate: int, run
) -> tuple[RunResult, dict[str, dict[str, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        sampler = Sampler(pids, Path(tmp), rate)
        try:
            result = run()
        finally:
            sampler.stop()
        RESULTS.mkdir(parents=True, exist_ok=True)
        tables = {}
        for process, file in sampler.files.items():
            if file.is_file():
                shutil.copy(file, RESULTS / f"profile-{name}-{process}.txt")
                tables[process] = summarize(file, rate)
    return result, tables


def print_table(title: str, tables: dict[str, dict[str, float]], scale: float, unit: str) -> None:
    """Each process's categories, largest first, as seconds x `scale` (rows under 0.5% left out)."""
    print(f"\n{title}")
    print(f"  {'process':8s} {'category':48s} {unit:>10s}")
    for process, table in tables.items():
        total = sum(table.values())
        for category, seconds in sorted(table.items(), key=lambda kv: -kv[1]):
            if seconds >= 0.005 * total:
                print(f"  {process:8s} {category:48s} {seconds * scale:10.2f}")
        print(f"  {process:8s} {'total CPU':48s} {total * scale:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--llm-args", default="", help="extra LLM service flags")
    args = parser.parse_args()

    logs = RESULTS / "profile-logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack = bench_stack(anchor_checkpoint(), logs, "bfloat16", [*CACHES_OFF_LLM, *args.llm_args.split()])
    stack.spec.vision_args = [*stack.spec.vision_args, *CACHES_OFF_VISION]
    stack.start(timeout_s=600)
    try:
        pids = {name: proc.pid for name, proc in stack.procs.items()}
        single = Workload.make(args.single, SINGLE_SEED)
        work = Workload.make(args.requests, 0)

        async def with_client(body):
            async with openai_client(stack.base_url) as api:
                return await body(api)

        asyncio.run(with_client(warm_up))
        one, single_tables = profile_phase(
            "single",
            pids,
            args.rate,
            lambda: asyncio.run(
                with_client(lambda c: one_by_one(c, "single", single.images, single.texts, args.max_tokens))
            ),
        )
        many, many_tables = profile_phase(
            "at-once",
            pids,
            args.rate,
            lambda: asyncio.run(with_client(lambda c: together(c, "at once", work, args.max_tokens))),
        )
    finally:
        stack.stop()
    s1, s2 = one.summary(), many.summary()
    tokens = s1["output_tokens"]
    print(
        f"\none at a time: {args.single} requests x {args.max_tokens} tokens: TPOT p50 "
        f"{s1['tpot_p50_s'] * 1000:.1f} ms, TTFT p50 {s1['ttft_p50_s'] * 1000:.0f} ms, {s1['wall_s']:.1f} s"
    )
    print_table("CPU per output token, one request at a time", single_tables, 1000 / tokens, "ms/token")
    print(
        f"\n{args.requests} at once: {s2['output_tok_per_s']:.0f} tok/s, TTFT p50 {s2['ttft_p50_s']:.2f} s "
        f"p99 {s2['ttft_p99_s']:.2f} s, wall {s2['wall_s']:.1f} s"
    )
    print_table(f"CPU seconds over the {args.requests}-at-once phase", many_tables, 1.0, "s")
    out = RESULTS / "profile.json"
    out.write_text(
        json.dumps(
            {"args": vars(args), "single": [s1, single_tables], "at_once": [s2, many_tables]}, indent=1
        )
    )
    print(f"\nwritten to {out}; collapsed stacks in {RESULTS}/profile-*.txt; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
