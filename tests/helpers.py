"""Test helpers: images, free ports, a loopback image server and the three-process stack."""

from __future__ import annotations

import base64
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

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
):
    """The three-process stack, allowed to read `image_dir` both as local files and over loopback
    http; yields (stack, http base url of image_dir). `extra_args` go to the gateway."""
    with image_server(image_dir) as http_base:
        args = ["--allow-private-urls", "--allowed-local-media-path", str(image_dir), *extra_args]
        stack = Stack(checkpoint, log_dir, args, llm_args, dtype).start()
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
    """vision_service + llm_service + gateway as three real processes on loopback."""

    def __init__(
        self,
        checkpoint: Path,
        log_dir: Path,
        gateway_args: list[str] = (),
        llm_args: list[str] = (),
        dtype: str | None = "float32",
    ):
        """`dtype` of both services: float32 by default (parity with transformers is checked in
        float32); None leaves the services' own default (auto: the checkpoint's dtype)."""
        self.checkpoint = checkpoint
        self.dtype_args = ["--dtype", dtype] if dtype else []
        self.log_dir = log_dir
        self.vision_port, self.llm_port, self.port, self.llm_metrics_port, self.vision_metrics_port = (
            free_ports(5)
        )
        self.gateway_args = list(gateway_args)
        self.llm_args = list(llm_args)
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def start(self, timeout_s: float = 180) -> Stack:
        ck = str(self.checkpoint)
        self._spawn(
            "vision",
            [
                "vision_service",
                "--checkpoint",
                ck,
                "--port",
                str(self.vision_port),
                "--metrics-port",
                str(self.vision_metrics_port),
                *self.dtype_args,
            ],
        )
        self._spawn(
            "llm",
            [
                "llm_service",
                "--checkpoint",
                ck,
                "--port",
                str(self.llm_port),
                "--metrics-port",
                str(self.llm_metrics_port),
                *self.dtype_args,
                *self.llm_args,
            ],
        )
        self._spawn(
            "gateway",
            [
                "gateway",
                "--checkpoint",
                ck,
                "--port",
                str(self.port),
                "--vision",
                f"127.0.0.1:{self.vision_port}",
                "--llm",
                f"127.0.0.1:{self.llm_port}",
                *self.gateway_args,
            ],
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"stack not healthy after {timeout_s}s:\n{self.logs()}")

    def llm_metric(self, name: str) -> float:
        """Current value of a metric of the LLM service (`name` may include labels)."""
        return _metric(self.llm_metrics_port, name)

    def vision_metric(self, name: str) -> float:
        return _metric(self.vision_metrics_port, name)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0  # a labelled counter that was never incremented is not exported yet


def serve_vision(encoder, body):
    """Run `await body(stub, address)` against a real VisionService gRPC server for `encoder`."""
    import asyncio

    import grpc

    from mmserve.grpc_util import channel_options, start_server
    from mmserve.proto import vision_pb2, vision_pb2_grpc
    from vision_service.server import VisionServicer

    service = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name

    async def go():
        server, _, port = await start_server(
            lambda s: vision_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(encoder), s),
            service,
            "127.0.0.1",
            0,
            64 << 20,
        )
        try:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=channel_options(64 << 20)
            ) as channel:
                return await body(vision_pb2_grpc.VisionServiceStub(channel), f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    return asyncio.run(go())
