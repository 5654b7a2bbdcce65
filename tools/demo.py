"""`python -m tools.demo [DIR]`: build the `make run` demo checkpoint once (random weights, offline) and
print its folder; `make run` serves it when no MODEL is given."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from tools.checkpoints import DEMO_SHAPE, build_llava_checkpoint


def default_demo_dir() -> Path:
    home = Path(os.environ.get("MMSERVE_HOME", Path.home() / ".cache" / "mmserve"))
    return home / "demo-llava"


def ensure_demo_checkpoint(path: Path | None = None) -> Path:
    """The demo checkpoint folder, built on first use."""
    path = Path(path) if path else default_demo_dir()
    if not (path / "config.json").is_file() or not (path / "mmserve_demo.json").is_file():
        print(f"Building the random-weight demo checkpoint at {path} (offline, once) ...", file=sys.stderr)
        with _stdout_to_stderr():
            build_llava_checkpoint(path, DEMO_SHAPE)
    return path


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 onto 2 for a while (native libraries write there too): stdout is the folder
    alone, for `make run` to read."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", help="output folder (default: $MMSERVE_HOME/demo-llava)")
    args = parser.parse_args()
    print(ensure_demo_checkpoint(Path(args.path) if args.path else None))


if __name__ == "__main__":
    main()
