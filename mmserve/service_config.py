"""What every gRPC service process's config has (model, bind address, limits, drain) and its flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from mmserve.checkpoint import check_model_dtype
from mmserve.cli import EnvFlags
from mmserve.grpc_util import DEFAULT_MAX_MESSAGE_BYTES
from mmserve.internal_auth import TOKEN_ENV, TOKEN_FILE_ENV, resolve_token
from mmserve.metric_labels import REPLICA_ENV, label_values


@dataclass
class ServiceConfig:
    """The shared fields; a service's config subclasses it (and sets its own `port` default)."""

    checkpoint: str  # model folder (config.json + safetensors)
    model_type: str | None = None  # family override (MODEL_TYPE); None = decide from config.json
    host: str = "127.0.0.1"
    port: int = 0  # the gRPC port
    dtype: str = (
        "auto"  # the model's weights and outputs; auto = the checkpoint's (float16 -> bfloat16 on CPU)
    )
    device: str = "cpu"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send/receive limit
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    # The `model_name` and `replica` labels of every metric: "" = the checkpoint folder's name (the
    # gateway's default id in /v1/models), and $MMSERVE_REPLICA else the host name (mmserve.metric_labels).
    model_name: str = ""
    replica: str = ""
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    drain_timeout_s: float = 30.0  # on SIGTERM: seconds in-flight calls get to finish (NOT_SERVING meanwhile)
    # The shared secret calls must carry (health and reflection excepted), or a file holding it; both
    # unset = off. After __post_init__, `internal_token` holds the secret either way.
    internal_token: str | None = field(default=None, repr=False)
    internal_token_file: str | None = None

    def __post_init__(self):
        self.internal_token = resolve_token(self.internal_token, self.internal_token_file)
        if not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint folder {self.checkpoint!r} does not exist")
        check_model_dtype(self.dtype)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        self.model_name = self.model_name or Path(self.checkpoint).resolve().name

    def metric_labels(self) -> dict[str, str]:
        return label_values(self.model_name, self.replica)


def service_flags(parser: argparse.ArgumentParser, config_cls: type[ServiceConfig], prefix: str) -> EnvFlags:
    """Flags of the shared fields, on `prefix`_* variables (VISION_PORT, LLM_DTYPE, ...); the service adds
    its own on the EnvFlags returned."""
    flags = EnvFlags(parser, config_cls)
    flags.add("checkpoint", "CHECKPOINT_PATH", help="model folder")
    flags.add("model_type", "MODEL_TYPE", help="family override, e.g. llava")
    flags.add("host", f"{prefix}_HOST", help="bind address")
    flags.add("port", f"{prefix}_PORT", int, "gRPC port")
    flags.add("dtype", f"{prefix}_DTYPE", help="auto|float32|bfloat16|float16 (auto: the checkpoint's)")
    flags.add("device", f"{prefix}_DEVICE", help="torch device")
    flags.add("max_message_bytes", "GRPC_MAX_MESSAGE_BYTES", int, "gRPC message size limit")
    flags.add("metrics_port", f"{prefix}_METRICS_PORT", int, "Prometheus /metrics port, 0 = off")
    flags.add(
        "model_name", "MODEL_NAME", help="model_name label on metrics (default: checkpoint folder name)"
    )
    flags.add("replica", REPLICA_ENV, help="replica label on metrics (default: the host name)")
    flags.add("threads", f"{prefix}_THREADS", int, "torch threads, 0 = all cores")
    flags.add(
        "drain_timeout_s",
        "DRAIN_TIMEOUT",
        float,
        "seconds in-flight calls get to finish after SIGTERM",
        flag="--drain-timeout",
    )
    internal_token_flags(flags)
    return flags


def internal_token_flags(flags: EnvFlags) -> None:
    """The shared secret's flags (the gateway's too). Prefer the variable or the file to the flag: a
    command line is visible to every local user."""
    flags.add("internal_token", TOKEN_ENV, help="shared secret gRPC calls must carry; unset = off")
    flags.add("internal_token_file", TOKEN_FILE_ENV, help="file holding the shared secret")


def parse_service_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The parsed flags as config keywords; a usage error when no checkpoint is given."""
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error("--checkpoint (or CHECKPOINT_PATH) is required")
    return vars(args)
