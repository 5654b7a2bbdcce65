"""`python -m mmserve inspect`: what mmserve would serve from a checkpoint folder, without loading any weights.

    python -m mmserve inspect /models/llava-1.5-7b-hf [--json] [--model-type llava]

The checks are `mmserve.checkpoint_check`'s (the launcher's own), the details `mmserve.checkpoint_facts`';
this module renders them and is the command line.
"""

from __future__ import annotations

import json
import os
import sys

from mmserve.checkpoint_check import resolve_checkpoint_path
from mmserve.checkpoint_facts import describe


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_report(report: dict) -> str:
    served = report["dtype"]["served_on_cpu"]
    stored = report["dtype"]["checkpoint"]
    token = report["image_token"]
    generation = report["generation_config"]
    weights = report["weights"]
    parameters = sum(w["parameters"] or 0 for w in weights)
    lines = [
        f"checkpoint      {report['checkpoint']}",
        f"family          {report['family']}  (model_type {report['model_type']!r}, "
        f"architectures {', '.join(report['architectures']) or '-'})",
        f"dtype           {stored} in the checkpoint; served as {served} on CPU by default"
        + (" (float16 runs as bfloat16 on CPU)" if stored != served else "")
        + "; LLM_DTYPE / VISION_DTYPE override",
        f"image token id  {report['image_token_id'] if report['image_token_id'] is not None else '-'}"
        + (f"  {token}" if token else ""),
        f"tokens/image    {report['tokens_per_image_detail']}",
        f"context length  {report['context_length'] if report['context_length'] is not None else '-'}  "
        f"({report['context_length_source']})",
        f"chat template   {report['chat_template_content_format']}"
        + ("  (content format)" if report["chat_template_content_format"] in ("string", "openai") else ""),
        "generation      "
        + (
            ", ".join(f"{k}={v}" for k, v in sorted(generation.items()))
            if generation
            else "(no generation_config.json)"
        ),
        f"weights         {len(weights)} file{'s' if len(weights) != 1 else ''}, {_size(report['weights_total_bytes'])}"
        + (f", {parameters / 1e6:.1f} M parameters" if parameters else ""),
    ]
    for w in weights:
        detail = (
            f"{w['tensors']} tensors, {'/'.join(w['dtypes'])}" if w["tensors"] is not None else "not opened"
        )
        lines.append(f"  {w['name']}  {_size(w['bytes'])}  ({detail})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mmserve.cli import debug_requested, startup_errors

    argv, debug = debug_requested(argv)
    parser = argparse.ArgumentParser(
        prog="python -m mmserve inspect",
        description="What mmserve detects in a checkpoint folder (no weights are loaded). Exits 1 with the "
        "reason when mmserve cannot serve it.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (or a Hub repo id already in the local cache)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--model-type", default=os.environ.get("MODEL_TYPE") or None, help="family override [MODEL_TYPE]"
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors [MMSERVE_DEBUG=1]")
    args = parser.parse_args(argv)
    with startup_errors("mmserve inspect", debug, code=1):
        folder, _ = resolve_checkpoint_path(args.checkpoint, None, download=False)
        report = describe(folder, args.model_type)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
