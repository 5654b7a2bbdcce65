"""Generated protobuf/gRPC stubs for protos/*.proto (see `make protos`).

The stubs are build outputs, not sources. When they are missing (a fresh checkout used without
`make`), importing this package generates them once, so that `pytest` or `python -m ...` work
directly.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PROTO_DIR = _HERE.parent.parent / "protos"
PROTO_FILES = ("tensor.proto", "vision.proto", "llm.proto")


def generate_stubs() -> None:
    """Compile protos/*.proto into this package with grpc_tools.protoc."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-Immserve/proto={_PROTO_DIR}",
        f"--python_out={_HERE.parent.parent}",
        f"--pyi_out={_HERE.parent.parent}",
        f"--grpc_python_out={_HERE.parent.parent}",
        *(f"mmserve/proto/{name}" for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def _stubs_stale() -> bool:
    for name in PROTO_FILES:
        stub = _HERE / name.replace(".proto", "_pb2.py")
        source = _PROTO_DIR / name
        if not stub.exists():
            return True
        if source.exists() and source.stat().st_mtime > stub.stat().st_mtime:
            return True
    return False


if _PROTO_DIR.exists() and _stubs_stale():
    generate_stubs()
