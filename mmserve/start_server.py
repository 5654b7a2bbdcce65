"""Start the whole stack (vision service, LLM service, gateway) from environment variables.

    MODEL_TYPE=llava CHECKPOINT_PATH=/models/llava TOKENIZER_PATH=/models/llava python -m mmserve.start_server

With no CHECKPOINT_PATH (or MODEL) it serves a small random-weight demo checkpoint, built offline the
first time. Ctrl-C (SIGINT) or SIGTERM stops all three processes.

Everything an operator can get wrong is checked before any service process starts (so before any weights
load): the checkpoint path (a folder, or a Hub repo id: `name` or `org/name`; a path is never sent to the
Hub), the checkpoint itself (`mmserve.inspect.validate_checkpoint`: config.json, family, weights), the
dtypes, and the ports. Each problem is one line on stderr and exit code 2; MMSERVE_DEBUG=1 or `--debug`
shows tracebacks instead.

Ports: PORT (gateway HTTP, default 8000) and, for the internal gRPC and metrics endpoints, VISION_PORT,
LLM_PORT, VISION_METRICS_PORT, LLM_METRICS_PORT: free ones are chosen when these are unset (or 0 for the
gRPC ports); a set port that is in use is an error naming its variable. The banner prints all of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.cli import StartupError, check_port_free, debug_requested, free_port, parse_port, startup_errors
from mmserve.demo import ensure_demo_checkpoint
from mmserve.inspect import is_hub_id, resolve_checkpoint_path, served_dtype, validate_checkpoint

# Internal ports: (variable, what listens there, whether 0 means "off" rather than "choose one").
INTERNAL_PORTS = (
    ("VISION_PORT", "vision gRPC", False),
    ("LLM_PORT", "LLM gRPC", False),
    ("VISION_METRICS_PORT", "vision metrics", True),
    ("LLM_METRICS_PORT", "LLM metrics", True),
)


def resolve_checkpoint(name: str | None, variable: str = "CHECKPOINT_PATH") -> tuple[str, bool]:
    """(local folder, is_demo) for a folder, a Hub repo id, or nothing (the demo). Something that looks
    like a path (see mmserve.inspect.is_hub_id) is never sent to the Hub."""
    if not name:
        return str(ensure_demo_checkpoint()), True
    folder, _ = resolve_checkpoint_path(name, variable)
    return folder, False


@dataclass
class Plan:
    """What start-up decided, before any process starts."""

    checkpoint: str
    is_demo: bool
    family: str
    host: str
    ports: dict[str, int]  # PORT and INTERNAL_PORTS' variables (a metrics port of 0 is off)
    dtypes: dict[str, str]  # "llm" / "vision" -> the dtype served
    checkpoint_dtype: str


def choose_ports(env, host: str) -> dict[str, int]:
    """PORT and the internal ports: set ones checked free, unset ones chosen free (distinct)."""
    ports: dict[str, int] = {}
    raw = env.get("PORT") or "8000"
    ports["PORT"] = parse_port("PORT", raw, allow_zero=True) or free_port(host)
    check_port_free(host, ports["PORT"], "PORT")
    for variable, _, zero_is_off in INTERNAL_PORTS:
        raw = env.get(variable, "")
        port = parse_port(variable, raw, allow_zero=True) if raw else None
        if port is not None and (port or zero_is_off):
            if port:
                check_port_free("127.0.0.1", port, variable)
            ports[variable] = port
            continue
        while True:  # distinct from the ports already picked (the OS may hand one out twice once closed)
            port = free_port("127.0.0.1")
            if port not in ports.values():
                break
        ports[variable] = port
    taken: dict[int, str] = {}
    for variable, port in ports.items():
        if port and port in taken:
            raise StartupError(
                f"{variable}={port} and {taken[port]}={port}: two services cannot share a port"
            )
        taken[port] = variable
    return ports


def plan_startup(env) -> Plan:
    """Every check that needs no service process: checkpoint, dtypes, ports. StartupError /
    CheckpointError / ValueError name the variable or file at fault."""
    name = env.get("CHECKPOINT_PATH") or env.get("MODEL")
    # `make run MODEL=...` passes MODEL on as CHECKPOINT_PATH (and keeps MODEL in the environment)
    variable = "MODEL" if name and env.get("MODEL") == name else "CHECKPOINT_PATH"
    checkpoint, is_demo = resolve_checkpoint(name, variable)
    tokenizer = env.get("TOKENIZER_PATH")
    if tokenizer and not Path(tokenizer).expanduser().is_dir() and not is_hub_id(tokenizer):
        raise StartupError(f"TOKENIZER_PATH={tokenizer}: no such folder")
    host = env.get("HOST", "127.0.0.1")
    ports = choose_ports(env, host)  # cheap checks first: the checkpoint's need torch imported
    summary = validate_checkpoint(checkpoint, env.get("MODEL_TYPE") or None)
    dtypes = {}
    for what in ("llm", "vision"):
        prefix = what.upper()
        requested = env.get(f"{prefix}_DTYPE") or "auto"
        try:
            dtypes[what] = served_dtype(checkpoint, requested, env.get(f"{prefix}_DEVICE") or "cpu")
        except ValueError as exc:
            raise StartupError(f"{prefix}_DTYPE={requested}: {exc}") from None
    return Plan(
        checkpoint=checkpoint,
        is_demo=is_demo,
        family=summary.family,
        host=host,
        ports=ports,
        dtypes=dtypes,
        checkpoint_dtype=summary.checkpoint_dtype,
    )


def _name(process: subprocess.Popen) -> str:
    return " ".join(str(a) for a in list(process.args)[:3])  # type: ignore[arg-type]


class _Stopped(Exception):
    pass


def wait_healthy(
    what: str, address: str, process: subprocess.Popen, timeout_s: float, stopping: threading.Event
) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if stopping.is_set():
                raise _Stopped
            if process.poll() is not None:
                raise SystemExit(
                    f"mmserve: error: the {what} exited with code {process.returncode} during start-up "
                    "(its error is above)"
                )
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit(f"mmserve: error: the {what} ({address}) is not healthy after {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> None:
    argv, debug = debug_requested(argv)
    parser = argparse.ArgumentParser(
        prog="python -m mmserve.start_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="tracebacks on start-up errors [MMSERVE_DEBUG=1]"
    )
    parser.parse_args(argv)
    with startup_errors("mmserve", debug):
        plan = plan_startup(os.environ)
    run(plan)


def run(plan: Plan) -> None:
    env = os.environ
    checkpoint, host, ports = plan.checkpoint, plan.host, plan.ports
    vision_port, llm_port = ports["VISION_PORT"], ports["LLM_PORT"]
    child_env = {
        **env,
        "VISION_METRICS_PORT": str(ports["VISION_METRICS_PORT"]),
        "LLM_METRICS_PORT": str(ports["LLM_METRICS_PORT"]),
    }
    common = ["--checkpoint", checkpoint] + (
        ["--model-type", env["MODEL_TYPE"]] if env.get("MODEL_TYPE") else []
    )
    python = sys.executable
    procs: list[subprocess.Popen] = []

    def shutdown(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    # Ctrl-C reaches the whole process group, so the services may exit before this process sees the
    # signal: a stop request is a flag, and a service exiting is only an error if no stop follows.
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        print(f"mmserve: starting the vision and LLM services ({plan.family}, {checkpoint}) ...", flush=True)
        procs.append(
            subprocess.Popen(
                [python, "-m", "vision_service", *common, "--port", str(vision_port)], env=child_env
            )
        )
        procs.append(
            subprocess.Popen([python, "-m", "llm_service", *common, "--port", str(llm_port)], env=child_env)
        )
        wait_healthy("vision service", f"127.0.0.1:{vision_port}", procs[0], 300, stopping)
        wait_healthy("LLM service", f"127.0.0.1:{llm_port}", procs[1], 300, stopping)
        gateway_args = [
            *common,
            "--vision",
            f"127.0.0.1:{vision_port}",
            "--llm",
            f"127.0.0.1:{llm_port}",
            "--host",
            host,
            "--port",
            str(ports["PORT"]),
        ]
        if env.get("TOKENIZER_PATH"):
            gateway_args += ["--tokenizer", env["TOKENIZER_PATH"]]
        procs.append(subprocess.Popen([python, "-m", "gateway", *gateway_args], env=child_env))

        def metrics(variable: str) -> str:
            return f"metrics :{ports[variable]}/metrics [{variable}]" if ports[variable] else "metrics off"

        dtypes = plan.dtypes
        served = (
            dtypes["llm"]
            if dtypes["llm"] == dtypes["vision"]
            else f"llm {dtypes['llm']}, vision {dtypes['vision']}"
        )
        banner = [
            "",
            "mmserve is starting:",
            f"  model     {checkpoint}  ({plan.family})"
            + ("  (random-weight DEMO checkpoint: output is gibberish)" if plan.is_demo else ""),
            f"  dtype     {served}  (checkpoint: {plan.checkpoint_dtype}; LLM_DTYPE / VISION_DTYPE override)",
            f"  gateway   http://{host}:{ports['PORT']} [PORT]  (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models; /metrics)",
            f"  vision    127.0.0.1:{vision_port} [VISION_PORT] (gRPC), {metrics('VISION_METRICS_PORT')}",
            f"  llm       127.0.0.1:{llm_port} [LLM_PORT] (gRPC), {metrics('LLM_METRICS_PORT')}",
            "  Ctrl-C stops all three.",
            "",
        ]
        print("\n".join(banner), flush=True)
        while not stopping.is_set() and all(p.poll() is None for p in procs):
            stopping.wait(0.5)
        if not stopping.wait(1.0):  # a service died on its own
            failed = [p for p in procs if p.poll() is not None]
            print(
                f"mmserve: {_name(failed[0])} exited with code {failed[0].returncode}; stopping the stack",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        print("\nstopping ...", flush=True)
    except _Stopped:
        print("\nstopped during start-up", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
