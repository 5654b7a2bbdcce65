"""Test helpers: images, free ports, a loopback image server, the three-process stack, health and metrics."""

from __future__ import annotations

import base64
import http.server
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmserve.metric_labels import LABEL_NAMES
from mmserve.supervisor import StackError, StackSpec, Supervisor

ROOT = Path(__file__).resolve().parent.parent


def make_image(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open at once while picking, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_run(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    while True:
        first = free_ports(1)[0]
        sockets = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(sockets):
                s.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()


@contextmanager
def image_server(folder: Path):
    """Serve `folder` over HTTP on loopback; yields the base url."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextmanager
def serving(
    checkpoint: Path,
    image_dir: Path,
    log_dir: Path,
    extra_args: list[str] = (),
    llm_args: list[str] = (),
    dtype: str | None = "float32",
    internal_token: str | None = None,
):
    """The three-process stack, allowed to read `image_dir` both as local files and over loopback
    http; yields (stack, http base url of image_dir). `extra_args` go to the gateway."""
    with image_server(image_dir) as http_base:
        args = ["--allow-private-urls", "--allowed-local-media-path", str(image_dir), *extra_args]
        stack = Stack(checkpoint, log_dir, args, llm_args, dtype, internal_token).start()
        try:
            yield stack, http_base
        finally:
            stack.stop()


def openai_client(stack: Stack):
    """The official client pointed at the stack's gateway (no retries: errors must show)."""
    import openai

    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_chat(client, text: str, urls: list[str], max_tokens: int, **kwargs):
    """One user turn (images first, then text), greedy, with the prompt and output token ids."""
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": text})
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"return_token_ids": True},
        **kwargs,
    )


class Stack:
    """vision_service + llm_service + gateway as three real processes on loopback, started by
    mmserve.supervisor (as `make run` starts them) on ports the OS binds and reports back."""

    def __init__(
        self,
        checkpoint: Path,
        log_dir: Path,
        gateway_args: list[str] = (),
        llm_args: list[str] = (),
        dtype: str | None = "float32",
        internal_token: str | None = None,
        llm_replicas: int = 1,
    ):
        """`dtype` of both services: float32 by default (parity with transformers is checked in
        float32); None leaves the services' own default (auto: the checkpoint's dtype).
        `internal_token`: the shared secret the services then require and the gateway sends.
        `llm_replicas`: LLM service processes behind the gateway (procs "llm", "llm-2", ...)."""
        dtype_args = ["--dtype", dtype] if dtype else []
        self.log_dir = log_dir
        # a metrics port of 0 is off, and the services do not report one the OS chose: picked free here
        # (replica i of the LLM service takes llm_metrics_port + i)
        self.llm_metrics_port, self.vision_metrics_port = free_port_run(llm_replicas), free_ports(1)[0]
        self.llm_metrics_ports = [self.llm_metrics_port + i for i in range(llm_replicas)]
        self.spec = StackSpec(
            str(checkpoint),
            vision_args=dtype_args,
            llm_args=[*dtype_args, *llm_args],
            gateway_args=list(gateway_args),
            llm_metrics_port=self.llm_metrics_port,
            vision_metrics_port=self.vision_metrics_port,
            internal_token=internal_token,
            llm_replicas=llm_replicas,
        )
        self.supervisor = Supervisor(log_dir=log_dir)
        self.vision_port = self.llm_port = self.port = 0  # known once started
        self.llm_ports: list[int] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {name: child.process for name, child in self.supervisor.children.items()}

    def start(self, timeout_s: float = 180) -> Stack:
        try:
            ports = self.supervisor.start(self.spec, timeout_s)
            self.vision_port, self.llm_port, self.port = ports.vision, ports.llm, ports.gateway
            self.llm_ports = ports.llm_replicas
            wait_healthy(self.base_url + "/health", timeout_s, self.procs["gateway"], self.logs)
        except StackError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.logs()}") from None
        except BaseException:  # whatever failed, no service outlives a stack that did not start
            self.stop()
            raise
        return self

    def llm_metric(self, name: str, absent: float | None = None) -> float:
        """Current value of a metric of the LLM service (`name` may include labels); see `metric`."""
        return metric(self.llm_metrics_port, name, absent)

    def vision_metric(self, name: str, absent: float | None = None) -> float:
        return metric(self.vision_metrics_port, name, absent)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        self.supervisor.stop()


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen, logs: Callable[[], str]) -> None:
    """Until GET `url` answers 200; an AssertionError naming `url`, with `logs()`, when `process` exits
    first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"exited with code {process.returncode} before {url} was healthy:\n{logs()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not healthy after {timeout_s:.0f}s:\n{logs()}")
        time.sleep(0.5)


# The launcher's banner names each port with its variable: "http://127.0.0.1:8000 [PORT]", ":9090/metrics [LLM_METRICS_PORT]"
BANNER_PORT = re.compile(r":(\d+)(?:/metrics)? \[([A-Z_]+)\]")
BANNER_END = "Ctrl-C stops all three."


@contextmanager
def launched(env: dict[str, str], log_path: Path, timeout_s: float = 300):
    """`python -m mmserve.start_server` (what `make run` runs) in its own process group; yields
    (process, {variable: port} from its banner) once the gateway is healthy; then Ctrl-C, as a terminal
    sends it (SIGINT to the whole group), and a clean exit is asserted."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mmserve.start_server"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while BANNER_END not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"no banner after {timeout_s:.0f}s:\n" + log_path.read_text()
            time.sleep(0.3)
        ports = {name: int(value) for value, name in BANNER_PORT.findall(log_path.read_text())}
        wait_healthy(f"http://127.0.0.1:{ports['PORT']}/health", timeout_s, process, log_path.read_text)
        yield process, ports
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert code in (0, -signal.SIGINT, 130), log_path.read_text()


def metric(port: int, name: str, absent: float | None = None) -> float:
    """The value of `name` on the /metrics page at `port` (see exported_value)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return exported_value(text, name, absent, f":{port}/metrics")


def exported_value(exposition: str, name: str, absent: float | None = None, where: str = "") -> float:
    """The value of the sample `name` in a Prometheus text exposition: `name` is written as exported,
    with its own labels if it has any (`mmserve_llm_requests_total{reason="abort"}`), without the
    model_name and replica labels every sample carries.

    A sample missing from the page fails, naming it (a renamed metric must not read as 0), unless
    `absent` is given: the value of a labelled series prometheus_client exports only from its first
    increment on (e.g. an outcome not seen yet)."""
    sample_name, _, label_text = name.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            own = {k: v for k, v in sample.labels.items() if k not in LABEL_NAMES}
            if sample.name == sample_name and own == labels:
                return sample.value
    if absent is None:
        raise AssertionError(f"metric {name} is not exported {where}")
    return absent


@asynccontextmanager
async def grpc_service(add_servicer, service_name: str, internal_token: str | None = None):
    """A real gRPC server of one service (with health and reflection) on a loopback port the OS picks;
    yields its address."""
    from mmserve.grpc_util import start_server

    server, _, port = await start_server(
        add_servicer, service_name, "127.0.0.1", 0, 64 << 20, internal_token=internal_token
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def serve_vision(encoder, body):
    """Run `await body(stub, address)` against a real VisionService gRPC server for `encoder`."""
    import asyncio

    import grpc

    from mmserve.grpc_util import channel_options
    from mmserve.proto import vision_pb2, vision_pb2_grpc
    from vision_service.server import VisionServicer

    service = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name

    def add(server):
        vision_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(encoder), server)

    async def go():
        async with grpc_service(add, service) as address:
            async with grpc.aio.insecure_channel(address, options=channel_options(64 << 20)) as channel:
                return await body(vision_pb2_grpc.VisionServiceStub(channel), address)

    return asyncio.run(go())
