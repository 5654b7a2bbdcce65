"""Process supervision shared by the launcher (`make run`) and the tests' stack: the three services
started at once on ports the OS binds (read back from their ready lines), watched, and stopped together."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mmserve.internal_auth import TOKEN_ENV, TOKEN_FILE_ENV

# The line each service prints once it listens (mmserve.grpc_util.serve, gateway.__main__), with the
# port it bound: how port 0 is read back.
READY_LINE = re.compile(r" ready on (?:http://)?\S+:(?P<port>\d+)\s*$")
LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A service exited, or did not become ready in time, during start-up; the message names it."""


class Stopped(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) while the stack was starting."""


class Child:
    """One service process (`python -m module ...`). Its stdout (with stderr when `sink` is a log) is
    copied line by line to `sink` by a thread, which keeps the port of its ready line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], sink: IO[str], stdin: bool = False):
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # on a terminal, errors stay on stderr; in a log file, they sit between the lines they follow
            stderr=None if sink is sys.stdout else subprocess.STDOUT,
            env=env,
            text=True,
        )
        self.port: int | None = None
        self._settled = threading.Event()  # a ready line was seen, or the output ended
        self._copier = threading.Thread(target=self._copy, args=(sink,), daemon=True)
        self._copier.start()

    def _copy(self, sink: IO[str]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sink.write(line)
            sink.flush()
            match = READY_LINE.search(line)
            if self.port is None and match:
                self.port = int(match["port"])
                self._settled.set()
        self._settled.set()

    def wait_ready(self, deadline: float, stopping: threading.Event) -> int:
        """The port the service bound, once its ready line is out; StackError when it exits first or
        the deadline passes, Stopped when a stop is requested meanwhile."""
        while not self._settled.wait(0.2):
            if stopping.is_set():
                raise Stopped
            if time.monotonic() > deadline:
                raise StackError(f"the {self.name} is not ready after the start-up deadline")
        if self.port is None:
            raise StackError(f"the {self.name} exited with code {self.process.wait()} during start-up")
        return self.port

    def finish_output(self, timeout_s: float = 5) -> None:
        """Wait for the copy of an exited child's last lines (before its log is closed)."""
        self._copier.join(timeout_s)

    def send(self, message: dict) -> None:
        """One JSON line on the child's stdin, which is then closed."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.close()
        except BrokenPipeError:  # it exited already: wait_ready reports how
            pass


@dataclass
class StackSpec:
    """How to start the three services. Ports: 0 lets the OS choose (the bound one is read back); a
    metrics port of 0 is off."""

    checkpoint: str
    common_args: list[str] = field(default_factory=list)  # every service: --model-type, --dtype ...
    vision_args: list[str] = field(default_factory=list)
    llm_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    vision_port: int = 0
    llm_port: int = 0
    port: int = 0  # the gateway's HTTP port
    vision_metrics_port: int = 0
    llm_metrics_port: int = 0
    # LLM service processes behind the one gateway (gateway.replicas balances over them); replica i > 0 is
    # named llm-<i+1>, and takes llm_port + i and llm_metrics_port + i when those are set
    llm_replicas: int = 1
    # The shared secret between the gateway and the services, handed to all three in their environment
    # (never on a command line, which every local user can read); None: whatever the environment says.
    internal_token: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.llm_replicas < 1:
            raise ValueError(f"llm_replicas must be >= 1, got {self.llm_replicas}")

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """The services' environment: `base` with the secret, when the spec names one."""
        if self.internal_token is None:
            return base
        others = {k: v for k, v in base.items() if k != TOKEN_FILE_ENV}
        return {**others, TOKEN_ENV: self.internal_token}

    def argv(self, service: str, replica: int = 0) -> list[str]:
        base = ["--checkpoint", self.checkpoint, *self.common_args]
        if service == "vision":
            ports = ["--port", str(self.vision_port), "--metrics-port", str(self.vision_metrics_port)]
            return ["vision_service", *base, *ports, *self.vision_args]
        if service == "llm":
            port = self.llm_port + replica if self.llm_port else 0
            metrics = self.llm_metrics_port + replica if self.llm_metrics_port else 0
            ports = ["--port", str(port), "--metrics-port", str(metrics)]
            return ["llm_service", *base, *ports, *self.llm_args]
        # the gateway learns the backends' addresses on stdin once they are bound (gateway.__main__)
        return ["gateway", *base, "--port", str(self.port), "--backends-on-stdin", *self.gateway_args]


@dataclass
class BoundPorts:
    vision: int
    llm: int  # the first LLM replica's
    gateway: int
    llm_replicas: list[int] = field(default_factory=list)  # every LLM replica's, in order


class Supervisor:
    """The stack's processes: started together, stopped together (SIGTERM, then SIGKILL after a grace).

    Output goes to `log_dir/<name>.log` when given, else to this process's stdout / stderr."""

    def __init__(self, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}
        self._logs: list[IO[str]] = []

    def spawn(
        self, name: str, argv: list[str], stdin: bool = False, env: dict[str, str] | None = None
    ) -> Child:
        sink: IO[str] = sys.stdout
        if self.log_dir is not None:
            sink = open(self.log_dir / f"{name}.log", "w")
            self._logs.append(sink)
        self.children[name] = Child(name, argv, self.env if env is None else env, sink, stdin)
        return self.children[name]

    def start(self, spec: StackSpec, timeout_s: float, stopping: threading.Event | None = None) -> BoundPorts:
        """Start vision, LLM and gateway at once; hand the gateway the backends' bound addresses as soon
        as both are ready; return the bound ports once the gateway listens."""
        stopping = stopping or threading.Event()
        deadline = time.monotonic() + timeout_s
        env = spec.env(self.env)
        vision = self.spawn("vision", spec.argv("vision"), env=env)
        llms = [
            self.spawn("llm" if i == 0 else f"llm-{i + 1}", spec.argv("llm", i), env=env)
            for i in range(spec.llm_replicas)
        ]
        gateway = self.spawn("gateway", spec.argv("gateway"), stdin=True, env=env)
        vision_port = vision.wait_ready(deadline, stopping)
        llm_ports = [llm.wait_ready(deadline, stopping) for llm in llms]
        ports = BoundPorts(vision_port, llm_ports[0], 0, llm_ports)
        llm_addresses = ",".join(f"{LOOPBACK}:{port}" for port in llm_ports)
        gateway.send({"vision": f"{LOOPBACK}:{ports.vision}", "llm": llm_addresses})
        ports.gateway = gateway.wait_ready(deadline, stopping)
        return ports

    def first_exit(self) -> Child | None:
        return next((c for c in self.children.values() if c.process.poll() is not None), None)

    def watch(self, stopping: threading.Event) -> Child | None:
        """Block until a stop is requested (None) or a service exits on its own (that one)."""
        while not stopping.wait(0.5):
            exited = self.first_exit()
            # Ctrl-C reaches the whole process group: a service may exit just before our own handler
            # runs, so an exit is only a failure when no stop request follows it
            if exited is not None and not stopping.wait(1.0):
                return exited
        return None

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to every service still running (gateway first), SIGKILL to those left after `grace_s`."""
        children = list(reversed(self.children.values()))
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            child.finish_output()
        for log in self._logs:
            log.close()
