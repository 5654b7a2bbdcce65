"""Structured output's cost in the LLM engine: decode throughput with a constraint against the same
requests without one, in the same run (the engine in this process, no gRPC or gateway in the way).

The anchor checkpoint (LLaVA-1.5-shaped, random weights, bfloat16, its Llama tokenizer: 32064 logits),
B text requests decoded together for M tokens each, greedy; each mode runs `--repeats` times,
alternating, and the best run counts (these machines are noisy). Modes:
  - free: no constraint, `ignore_eos` (the baseline: the sampler's argmax fast path);
  - regex: `[a-z ]+` (never complete; most of the vocabulary masked), `ignore_eos`: the grammar may
    still end a request early by allowing its end token (the tokens generated are reported);
  - free-min / regex-min: the same with `min_tokens` = M instead of `ignore_eos`, so that every request
    runs exactly M tokens in both (and both take the sampler's masking path): their ratio is the mask's
    own cost at a constant batch;
  - json: a JSON schema with a free-text string and an array of strings, `ignore_eos` (a random model
    may complete it early).

    python -m benchmarks.bench_structured [--batch 1 8] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import date
from pathlib import Path

from benchmarks.bench_vision import anchor_checkpoint
from tests.helpers import ROOT

SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}}},
    "required": ["caption", "objects"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from transformers import AutoTokenizer

    from llm_service.config import LLMConfig
    from llm_service.engine import Engine
    from llm_service.models import load_language_model
    from mmserve.sampling import SamplingParams, StructuredOutput
    from mmserve.structured import json_schema
    from mmserve.wire import GenerateRequest

    checkpoint = anchor_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    engine = Engine(load_language_model(LLMConfig(checkpoint=str(checkpoint))), max_running=max(args.batch))
    regex = StructuredOutput("regex", "[a-z ]+")
    modes = {  # name: (constraint, min_tokens instead of ignore_eos)
        "free": (None, False),
        "regex": (regex, False),
        "free-min": (None, True),
        "regex-min": (regex, True),
        "json": (json_schema(SCHEMA), False),
    }

    async def run(batch: int, mode: tuple, tag: str) -> tuple[int, float]:
        structured, min_tokens = mode

        async def one(i: int) -> int:
            ids = tokenizer(f"USER: Describe picture {i} of {tag}. ASSISTANT:")["input_ids"]
            params = SamplingParams(
                temperature=0.0,
                max_new_tokens=args.max_tokens,
                ignore_eos=not min_tokens,
                min_new_tokens=args.max_tokens if min_tokens else 0,
                structured=structured,
            )
            return sum(
                [
                    len(o.token_ids)
                    async for o in engine.generate(GenerateRequest(f"{tag}-{i}", ids, [], params))
                ]
            )

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(batch)))
        return sum(tokens), time.perf_counter() - start

    results: dict[str, dict] = {}
    try:
        for warm_up in ("json", "regex-min"):  # the tokenizer load, the first compiles
            asyncio.run(run(2, modes[warm_up], "warm-up"))
        for batch in args.batch:
            best: dict[str, tuple[int, float]] = {}
            for r in range(args.repeats):
                for name, mode in modes.items():
                    tokens, wall = asyncio.run(run(batch, mode, f"{name}-{batch}-{r}"))
                    if name not in best or tokens / wall > best[name][0] / best[name][1]:
                        best[name] = (tokens, wall)
            for name, (tokens, wall) in best.items():
                base = "free-min" if name.endswith("-min") else "free"
                rate, base_rate = tokens / wall, best[base][0] / best[base][1]
                results[f"{name}@{batch}"] = {
                    "tokens": tokens,
                    "wall_s": wall,
                    "tok_s": rate,
                    "baseline": base,
                    "vs_baseline": rate / base_rate,
                }
                print(
                    f"batch {batch:3d} {name:9s} {tokens:5d} tokens in {wall:6.2f}s  {rate:8.1f} tok/s  "
                    f"{rate / base_rate:5.2f}x {base}"
                )
    finally:
        engine.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": str(date.today()),
        "cores": os.cpu_count(),
        "max_tokens": args.max_tokens,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
