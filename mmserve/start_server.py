"""Start the whole stack (vision service, LLM service, gateway) from environment variables.

    MODEL_TYPE=llava CHECKPOINT_PATH=/models/llava TOKENIZER_PATH=/models/llava python -m mmserve.start_server

With no CHECKPOINT_PATH (or MODEL) it serves a small random-weight demo checkpoint, built offline the
first time. Ctrl-C (SIGINT) or SIGTERM stops all three processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.demo import ensure_demo_checkpoint


def resolve_checkpoint(name: str | None) -> tuple[str, bool]:
    """(local folder, is_demo) for a folder, a hub id, or nothing (the demo)."""
    if not name:
        return str(ensure_demo_checkpoint()), True
    if Path(name).is_dir():
        return str(Path(name).resolve()), False
    from huggingface_hub import snapshot_download

    print(f"{name!r} is not a local folder; downloading it from the Hugging Face Hub ...", flush=True)
    return snapshot_download(name), False


def _name(process: subprocess.Popen) -> str:
    return " ".join(str(a) for a in list(process.args)[:3])  # type: ignore[arg-type]


class _Stopped(Exception):
    pass


def wait_healthy(
    address: str, process: subprocess.Popen, timeout_s: float, stopping: threading.Event
) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if stopping.is_set():
                raise _Stopped
            if process.poll() is not None:
                raise SystemExit(f"{address} exited with code {process.returncode} during startup")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit(f"{address} not healthy after {timeout_s:.0f}s")


def main() -> None:
    env = os.environ
    checkpoint, is_demo = resolve_checkpoint(env.get("CHECKPOINT_PATH") or env.get("MODEL"))
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    vision_port = env.get("VISION_PORT", "50051")
    llm_port = env.get("LLM_PORT", "50052")
    # Prometheus endpoints of the two gRPC services (the gateway serves /metrics on its own port).
    child_env = {"VISION_METRICS_PORT": "9101", "LLM_METRICS_PORT": "9102", **env}
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
        procs.append(
            subprocess.Popen([python, "-m", "vision_service", *common, "--port", vision_port], env=child_env)
        )
        procs.append(
            subprocess.Popen([python, "-m", "llm_service", *common, "--port", llm_port], env=child_env)
        )
        wait_healthy(f"127.0.0.1:{vision_port}", procs[0], 300, stopping)
        wait_healthy(f"127.0.0.1:{llm_port}", procs[1], 300, stopping)
        gateway_args = [
            *common,
            "--vision",
            f"127.0.0.1:{vision_port}",
            "--llm",
            f"127.0.0.1:{llm_port}",
            "--host",
            host,
            "--port",
            port,
        ]
        if env.get("TOKENIZER_PATH"):
            gateway_args += ["--tokenizer", env["TOKENIZER_PATH"]]
        procs.append(subprocess.Popen([python, "-m", "gateway", *gateway_args]))
        banner = [
            "",
            "mmserve is starting:",
            f"  model     {checkpoint}"
            + ("  (random-weight DEMO checkpoint: output is gibberish)" if is_demo else ""),
            f"  gateway   http://{host}:{port}   (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models)",
            f"  vision    127.0.0.1:{vision_port} (gRPC), metrics :{child_env['VISION_METRICS_PORT']}/metrics",
            f"  llm       127.0.0.1:{llm_port} (gRPC), metrics :{child_env['LLM_METRICS_PORT']}/metrics",
            "  Ctrl-C stops all three.",
            "",
        ]
        print("\n".join(banner), flush=True)
        while not stopping.is_set() and all(p.poll() is None for p in procs):
            stopping.wait(0.5)
        if not stopping.wait(1.0):  # a service died on its own
            failed = [p for p in procs if p.poll() is not None]
            print(
                f"{_name(failed[0])} exited with code {failed[0].returncode}; stopping the stack", flush=True
            )
            sys.exit(1)
        print("\nstopping ...", flush=True)
    except _Stopped:
        print("\nstopped during start-up", flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
