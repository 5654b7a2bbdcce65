"""Generated protobuf/gRPC stubs for protos/*.proto: build outputs of `make protos`, never made at import.

The build generates them (`make protos`, `make install`, the Dockerfile, all via `python -m tools.protos`);
importing this package without them is an ImportError that says so, rather than running protoc here.
"""

import warnings
from pathlib import Path

PROTO_FILES = ("tensor.proto", "vision.proto", "llm.proto")
STUB_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")  # (the .pyi type stubs are for mypy only)

_HERE = Path(__file__).resolve().parent
_PROTO_DIR = _HERE.parent.parent / "protos"  # present in a checkout, absent from an installed wheel


def _stubs(proto: str) -> list[Path]:
    return [_HERE / proto.replace(".proto", suffix) for suffix in STUB_SUFFIXES]


def _check_stubs() -> None:
    missing = [stub.name for proto in PROTO_FILES for stub in _stubs(proto) if not stub.is_file()]
    if missing:
        raise ImportError(
            f"mmserve.proto: the generated gRPC stubs are missing ({', '.join(missing)}): "
            "run `make protos` (or `python -m tools.protos`) in the checkout first"
        )
    for proto in PROTO_FILES:
        source = _PROTO_DIR / proto
        if source.is_file() and source.stat().st_mtime > _stubs(proto)[0].stat().st_mtime:
            # stale, not broken: the build regenerates them; a plain `pytest` run just says so
            warnings.warn(f"mmserve.proto: stubs older than protos/{proto}: run `make protos`", stacklevel=2)


_check_stubs()
