"""`python -m mmserve COMMAND`: `inspect DIR` (what mmserve detects in a checkpoint), `serve` (the
whole stack from environment variables, as `python -m mmserve.start_server`)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m mmserve COMMAND [...]

commands:
  inspect DIR [--json]   what mmserve detects in a checkpoint folder (family, dtype, image tokens,
                         context length, chat template format, generation defaults, weight files);
                         loads no weights; exits 1 with the reason when it cannot be served
  serve [--debug]        start vision + LLM + gateway from environment variables (= python -m mmserve.start_server)
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command == "inspect":
        from mmserve.inspect import main as inspect_main

        return inspect_main(rest)
    if command == "serve":
        from mmserve.start_server import main as serve_main

        serve_main(rest)
        return 0
    print(USAGE, end="", file=sys.stderr)
    print(f"python -m mmserve: error: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
