"""`python -m tools.protos`: compile protos/*.proto into mmserve/proto/ (the build step behind `make protos`).

Imports nothing from mmserve: mmserve.proto refuses to import until these stubs exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate_stubs(root: Path = ROOT) -> None:
    """Write {name}_pb2.py, _pb2.pyi and _pb2_grpc.py for each proto into root/mmserve/proto/."""
    from grpc_tools import protoc

    protos = sorted(path.name for path in (root / "protos").glob("*.proto"))
    # -I maps protos/ onto the package path, so the stubs import each other as mmserve.proto.*
    args = [
        "protoc",
        f"-Immserve/proto={root / 'protos'}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *(f"mmserve/proto/{name}" for name in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate_stubs(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
