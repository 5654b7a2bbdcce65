"""The launcher's start-up checks of a checkpoint, before any weights load: where it is, what is in it.

`resolve_checkpoint_path` (a folder or a Hub repo id, never a path sent to the Hub as an id) and
`validate_checkpoint` (config.json readable, family known, weights present with readable headers) run in
`mmserve.start_server` before it starts any service process, and under `python -m mmserve inspect`.
Weight files are only stat'ed and, for safetensors, their JSON header read.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mmserve.cli import StartupError, one_line
from mmserve.errors import CheckpointError

# A Hugging Face Hub repo id, as the Hub validates them: `name` or `org/name`, each part of letters, digits,
# `-`, `_` and `.`, not starting or ending with `-` or `.`, no `--` or `..`, at most 96 characters.
# Anything else (`/abs`, `./rel`, `../rel`, `~/x`, `a/b/c`, a backslash or a drive letter) is a local path
# and is never sent to the Hub.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name


def resolve_checkpoint_path(
    name: str, variable: str | None = "CHECKPOINT_PATH", download: bool = True
) -> tuple[str, bool]:
    """(local folder, came from the Hub) for `name`: a folder holding config.json, else a Hub repo id
    (downloaded, or with `download=False` only looked up in the local Hugging Face cache). A StartupError
    naming `variable`, the path and what is missing otherwise."""
    what = f"{variable}={name}" if variable else name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StartupError(
                f"{what}: the folder has no config.json (a Hugging Face checkpoint folder holds "
                "config.json and the weights)"
            )
        return str(path.resolve()), False
    if path.exists():
        raise StartupError(f"{what}: is a file; expected a checkpoint folder (config.json + weights)")
    if not is_hub_id(name):
        raise StartupError(
            f"{what}: no such folder (and not a Hugging Face Hub repo id, which is `name` or `org/name`)"
        )
    from huggingface_hub import snapshot_download

    if not download:
        try:
            return snapshot_download(name, local_files_only=True), True
        except Exception:  # noqa: BLE001 - not in the cache, in whatever way the hub client says it
            raise StartupError(
                f"{what}: no such folder, and not in the local Hugging Face cache as a repo id"
            ) from None
    print(f"{name!r} is not a local folder; downloading it from the Hugging Face Hub ...", flush=True)
    try:
        return snapshot_download(name), True
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, ...: one line either way
        raise StartupError(
            f"{what}: no such folder, and downloading it as a Hugging Face Hub repo id failed "
            f"({type(exc).__name__}: {one_line(exc)[:300]})"
        ) from None


@dataclass
class WeightFile:
    name: str  # relative to the checkpoint folder
    bytes: int
    tensors: int | None = None  # from the safetensors header; None for .bin files (not opened)
    parameters: int | None = None
    dtypes: list[str] = field(default_factory=list)


@dataclass
class CheckpointSummary:
    path: str
    family: str
    model_type: str | None
    architectures: list[str]
    checkpoint_dtype: str
    weights: list[WeightFile]
    config: dict = field(repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)


_ST_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


def safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (its first 8 + N bytes), CheckpointError naming the file if it
    is not one (truncated download, an LFS pointer, HTML saved under the name...)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise CheckpointError(
                f"{path}: not a safetensors file (header length {length} > file size {size})"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _weight_file(folder: Path, path: Path) -> WeightFile:
    entry = WeightFile(
        str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path), path.stat().st_size
    )
    if path.suffix == ".safetensors":
        tensors = {k: v for k, v in safetensors_header(path).items() if k != "__metadata__"}
        entry.tensors = len(tensors)
        parameters = 0
        for value in tensors.values():
            count = 1
            for dim in value.get("shape", []) if isinstance(value, dict) else []:
                count *= int(dim)
            parameters += count
        entry.parameters = parameters
        entry.dtypes = sorted(
            {
                _ST_DTYPE_NAMES.get(str(v.get("dtype")), str(v.get("dtype")))
                for v in tensors.values()
                if isinstance(v, dict)
            }
        )
    return entry


def validate_checkpoint(path: str | Path, model_type: str | None = None) -> CheckpointSummary:
    """The start-up check of a checkpoint folder, before any weights load: config.json readable, the family
    detected (and agreeing with `model_type`), weight files present (safetensors headers readable),
    generation_config.json (when present) valid JSON. CheckpointError naming the file and key otherwise."""
    from mmserve.checkpoint import checkpoint_dtype, read_config, weight_files
    from mmserve.families import detect_family

    folder = Path(path)
    config = read_config(folder)
    family = detect_family(folder, model_type)
    weights = [_weight_file(folder, f) for f in weight_files(folder)]
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            json.loads(generation.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{generation}: not valid JSON ({exc})") from None
    return CheckpointSummary(
        path=str(folder),
        family=family,
        model_type=config.get("model_type"),
        architectures=list(config.get("architectures") or []),
        checkpoint_dtype=checkpoint_dtype(config),
        weights=weights,
        config=config,
    )


def served_dtype(checkpoint: str | Path, requested: str = "auto", device: str = "cpu") -> str:
    """What a service started with `requested` on `device` serves in (resolve_dtype, without its warning)."""
    from mmserve.checkpoint import resolve_dtype

    logger = logging.getLogger("mmserve.checkpoint")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return resolve_dtype(requested, checkpoint, device, "inspect")
    finally:
        logger.setLevel(level)
