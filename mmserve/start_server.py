"""Start the whole stack (vision service, LLM service, gateway) from environment variables.

    MODEL_TYPE=llava CHECKPOINT_PATH=/models/llava TOKENIZER_PATH=/models/llava python -m mmserve.start_server

CHECKPOINT_PATH (or MODEL) is required; `make run` without one builds the random-weight demo checkpoint
first (`python -m tools.demo`) and passes its folder. Ctrl-C (SIGINT) or SIGTERM stops all three processes.

Everything an operator can get wrong is checked before any service process starts (so before any weights
load): the checkpoint path (a folder, or a Hub repo id: `name` or `org/name`; a path is never sent to the
Hub), the checkpoint itself (`mmserve.checkpoint_check.validate_checkpoint`: config.json, family, weights), the
dtypes, and the ports. Each problem is one line on stderr and exit code 2; MMSERVE_DEBUG=1 or `--debug`
shows tracebacks instead.

Ports: PORT (gateway HTTP, default 8000) and, for the internal gRPC and metrics endpoints, VISION_PORT,
LLM_PORT, VISION_METRICS_PORT, LLM_METRICS_PORT. Unset (or 0) gRPC ports and PORT=0 are bound by the OS and
read back from the services; unset metrics ports are chosen free (0 turns one off). A set port that is in
use is an error naming its variable. The banner prints all of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from mmserve.checkpoint_check import is_hub_id, resolve_checkpoint_path, served_dtype, validate_checkpoint
from mmserve.cli import StartupError, check_port_free, debug_requested, free_port, parse_port, startup_errors
from mmserve.internal_auth import TOKEN_ENV, TOKEN_FILE_ENV, resolve_token
from mmserve.supervisor import BoundPorts, StackError, StackSpec, Stopped, Supervisor

# Internal ports: (variable, what listens there, whether 0 means "off" rather than "choose one").
INTERNAL_PORTS = (
    ("VISION_PORT", "vision gRPC", False),
    ("LLM_PORT", "LLM gRPC", False),
    ("VISION_METRICS_PORT", "vision metrics", True),
    ("LLM_METRICS_PORT", "LLM metrics", True),
)


def resolve_checkpoint(name: str | None, variable: str = "CHECKPOINT_PATH") -> tuple[str, bool]:
    """(local folder, is_demo) for a folder or a Hub repo id. Something that looks like a path (see
    mmserve.checkpoint_check.is_hub_id) is never sent to the Hub. A random-weight checkpoint built by
    tools.checkpoints (the demo among them) carries mmserve_demo.json."""
    if not name:
        raise StartupError(
            "CHECKPOINT_PATH (or MODEL) is not set: name a checkpoint folder or Hub repo id "
            "(`make run` builds and serves the random-weight demo checkpoint when none is given)"
        )
    folder, _ = resolve_checkpoint_path(name, variable)
    return folder, (Path(folder) / "mmserve_demo.json").is_file()


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
    internal_token: bool = False  # the services get the shared secret from the environment


def choose_ports(env, host: str) -> dict[str, int]:
    """PORT and the internal ports: set ones checked free and distinct; unset gRPC ports 0 (the OS binds
    them; the supervisor reads them back), unset metrics ports chosen free now."""
    ports = {"PORT": parse_port("PORT", env.get("PORT") or "8000", allow_zero=True)}
    for variable, _, is_metrics in INTERNAL_PORTS:
        raw = env.get(variable, "")
        if raw:
            ports[variable] = parse_port(variable, raw, allow_zero=True)
        else:  # the services cannot report a metrics port the OS chose: pick one here
            ports[variable] = free_port("127.0.0.1") if is_metrics else 0
    taken: dict[int, str] = {}
    for variable, port in ports.items():
        if port and port in taken:
            raise StartupError(
                f"{variable}={port} and {taken[port]}={port}: two services cannot share a port"
            )
        taken[port] = variable
        if port:
            check_port_free(host if variable == "PORT" else "127.0.0.1", port, variable)
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
    # the services read it from the environment they inherit; a bad file is named here, before they start
    internal_token = resolve_token(env.get(TOKEN_ENV), env.get(TOKEN_FILE_ENV)) is not None
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
        internal_token=internal_token,
    )


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


def stack_spec(plan: Plan, env) -> StackSpec:
    common = ["--model-type", env["MODEL_TYPE"]] if env.get("MODEL_TYPE") else []
    gateway = ["--host", plan.host]
    if env.get("TOKENIZER_PATH"):
        gateway += ["--tokenizer", env["TOKENIZER_PATH"]]
    ports = plan.ports
    return StackSpec(
        checkpoint=plan.checkpoint,
        common_args=common,
        gateway_args=gateway,
        vision_port=ports["VISION_PORT"],
        llm_port=ports["LLM_PORT"],
        port=ports["PORT"],
        vision_metrics_port=ports["VISION_METRICS_PORT"],
        llm_metrics_port=ports["LLM_METRICS_PORT"],
    )


def banner(plan: Plan, bound: BoundPorts) -> str:
    def metrics(variable: str) -> str:
        port = plan.ports[variable]
        return f"metrics :{port}/metrics [{variable}]" if port else "metrics off"

    dtypes = plan.dtypes
    served = (
        dtypes["llm"]
        if dtypes["llm"] == dtypes["vision"]
        else f"llm {dtypes['llm']}, vision {dtypes['vision']}"
    )
    demo = "  (random-weight DEMO checkpoint: output is gibberish)" if plan.is_demo else ""
    lines = [
        "",
        "mmserve is starting:",
        f"  model     {plan.checkpoint}  ({plan.family}){demo}",
        f"  dtype     {served}  (checkpoint: {plan.checkpoint_dtype}; LLM_DTYPE / VISION_DTYPE override)",
        f"  gateway   http://{plan.host}:{bound.gateway} [PORT]  (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models; /metrics)",
        f"  vision    127.0.0.1:{bound.vision} [VISION_PORT] (gRPC), {metrics('VISION_METRICS_PORT')}",
        f"  llm       127.0.0.1:{bound.llm} [LLM_PORT] (gRPC), {metrics('LLM_METRICS_PORT')}",
        f"  internal  gRPC shared secret {'on' if plan.internal_token else 'off'} [{TOKEN_ENV}]",
        "  Ctrl-C stops all three.",
        "",
    ]
    return "\n".join(lines)


def run(plan: Plan) -> None:
    """Start the stack, print the banner once the gateway listens, supervise until Ctrl-C / SIGTERM or
    until a service exits on its own (exit code 1)."""
    stopping = threading.Event()  # Ctrl-C also reaches the services themselves: they stop on their own
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    supervisor = Supervisor()
    try:
        print(
            f"mmserve: starting the vision and LLM services and the gateway ({plan.family}, {plan.checkpoint}) ...",
            flush=True,
        )
        bound = supervisor.start(stack_spec(plan, os.environ), timeout_s=300, stopping=stopping)
        print(banner(plan, bound), flush=True)
        failed = supervisor.watch(stopping)
        if failed is not None:
            code = failed.process.returncode
            print(
                f"mmserve: the {failed.name} exited with code {code}; stopping the stack",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        print("\nstopping ...", flush=True)
    except Stopped:
        print("\nstopped during start-up", flush=True)
    except StackError as exc:
        sys.exit(f"mmserve: error: {exc} (its error is above)")
    finally:
        supervisor.stop(grace_s=15)


if __name__ == "__main__":
    main()
