"""Command-line flags that fall back to environment variables, then to a config dataclass's defaults;
start-up errors as one line (no traceback unless MMSERVE_DEBUG=1 / --debug); port checks."""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import MISSING, fields


def dataclass_defaults(cls) -> dict:
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}


class EnvFlags:
    """`--some-name` (dest `some_name`) defaulting to $ENV_NAME, else the dataclass field's default."""

    def __init__(self, parser: argparse.ArgumentParser, config_cls):
        self.parser = parser
        self.defaults = dataclass_defaults(config_cls)

    def add(self, name: str, env_name: str, kind=str, help: str = "", flag: str | None = None) -> None:
        raw = os.environ.get(env_name)
        default = self.defaults.get(name)
        if raw not in (None, ""):
            try:
                default = kind(raw)
            except ValueError:
                raise ValueError(f"{env_name}={raw!r} is not a valid {kind.__name__}") from None
        self.parser.add_argument(
            flag or "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=default,
            help=f"{help} [{env_name}]",
        )

    def switch(self, name: str, env_name: str, help: str = "") -> None:
        """A boolean flag, also on when $ENV_NAME is 1."""
        self.parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            action="store_true",
            default=os.environ.get(env_name, "") == "1",
            help=f"{help} [{env_name}=1]",
        )


# ---- start-up errors and ports (shared by the launcher and the three services' entry points) ----------


class StartupError(Exception):
    """A start-up problem the operator can fix (a bad path or setting, a busy port): printed as one line,
    no traceback (set MMSERVE_DEBUG=1 or pass --debug for one)."""


def debug_requested(argv: list[str] | None) -> tuple[list[str], bool]:
    """argv without `--debug`, and whether debugging is on (`--debug` or MMSERVE_DEBUG=1)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MMSERVE_DEBUG", "") not in ("", "0")
    if "--debug" in args:
        os.environ["MMSERVE_DEBUG"] = "1"  # child processes and later checks see it too
    return [a for a in args if a != "--debug"], debug


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def startup_errors(prog: str, debug: bool | None = None, code: int = 2):
    """Turn the start-up errors an operator can fix into `prog: error: message` on stderr and exit `code`
    (argparse's style and code), instead of a traceback. MMSERVE_DEBUG=1 (or --debug) re-raises them."""
    from mmserve.errors import CheckpointError

    if debug is None:
        debug = os.environ.get("MMSERVE_DEBUG", "") not in ("", "0")
    try:
        yield
    except (StartupError, CheckpointError, ValueError) as exc:
        if debug:
            raise
        import sys

        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def port_busy(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be listened on (the OS's error), None when it can.

    Binds and listens the way servers do (SO_REUSEADDR, so a port left in TIME_WAIT by a stopped server
    counts as free) and closes at once."""
    import socket

    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as exc:
            return exc
    return None


def check_port_free(host: str, port: int, variable: str) -> None:
    """StartupError naming `variable` when `host:port` cannot be listened on (checked before any model
    loads)."""
    import errno

    error = port_busy(host, port)
    if error is None:
        return
    if error.errno == errno.EADDRINUSE:
        raise StartupError(
            f"{variable}={port}: {host}:{port} is already in use by another process (another mmserve stack?); "
            f"stop it, or set {variable} to a free port"
        )
    raise StartupError(f"{variable}={port}: cannot listen on {host}:{port} ({error.strerror or error})")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bind port 0, read it back)."""
    import socket

    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def parse_port(variable: str, raw: str, allow_zero: bool = False) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise StartupError(f"{variable}={raw!r} is not a port number") from None
    if not (0 if allow_zero else 1) <= port < 65536:
        raise StartupError(f"{variable}={port} is out of range (1..65535)")
    return port
