"""Start-up that tells the truth: the real launcher (`python -m mmserve.start_server`) and services, as
subprocesses. Every error case is one line on stderr, a non-zero exit and no traceback, and happens before
any service process starts (so before any weights load). No timing assertions: each case prints how long
it took (`pytest -s` shows them)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, launched

PORT_VARIABLES = ("PORT", "VISION_PORT", "LLM_PORT", "VISION_METRICS_PORT", "LLM_METRICS_PORT")
STARTED = "starting the vision and LLM services"  # the launcher's line just before it starts any service


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The `make run` demo's geometry (336 px -> 576 image tokens), tiny widths."""
    from tools.checkpoints import DEMO_SHAPE, build_llava_checkpoint

    return build_llava_checkpoint(tmp_path_factory.mktemp("startup") / "demo", DEMO_SHAPE)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    drop = (
        "CHECKPOINT_PATH",
        "MODEL",
        "MODEL_TYPE",
        "TOKENIZER_PATH",
        "MMSERVE_DEBUG",
        "LLM_DTYPE",
        "VISION_DTYPE",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop + PORT_VARIABLES}
    env["MMSERVE_HOME"] = str(tmp_path / "home")
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], label: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    print(f"\n[startup timing] {label}: exit {result.returncode} after {time.monotonic() - started:.2f}s")
    return result


def launch(env: dict[str, str], label: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mmserve.start_server"], env, label)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, prog: str = "mmserve") -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith(f"{prog}: error: "), output
    for fragment in fragments:
        assert fragment in lines[0], output
    # failed before any service process started, so before any weights loaded
    assert STARTED not in output and " loaded" not in output and "ready on" not in output, output
    return lines[0]


@contextmanager
def listening_socket(port: int = 0):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        yield sock.getsockname()[1]


# ---- the generated stubs ---------------------------------------------------------------------------


def test_missing_stubs_fail_the_import_naming_make_protos(tmp_path):
    """Stubs come from the build (`make protos`), never from an import: without them, importing the
    services is an ImportError that says what to run, and protoc does not run."""
    no_stubs = shutil.ignore_patterns("*_pb2*", "__pycache__")
    for folder in ("mmserve", "gateway", "llm_service", "vision_service", "pipeline", "protos"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=no_stubs)
    code = "import gateway, llm_service, vision_service"
    # `-c` puts the working directory first on sys.path: the copy is imported, not the checkout
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ImportError" in result.stderr and "make protos" in result.stderr, result.stderr
    assert not list((tmp_path / "mmserve" / "proto").glob("*_pb2*")), "stubs were generated at import"


# ---- the checkpoint ---------------------------------------------------------------------------------


def test_no_checkpoint_named(tmp_path):
    """The launcher never builds the demo itself (`make run` does, with tools.demo)."""
    line = assert_one_line_error(launch(clean_env(tmp_path), "no CHECKPOINT_PATH"), "CHECKPOINT_PATH")
    assert "make run" in line


def test_no_such_path(tmp_path):
    result = launch(clean_env(tmp_path, CHECKPOINT_PATH="/no/such/path"), "CHECKPOINT_PATH=/no/such/path")
    line = assert_one_line_error(result, "CHECKPOINT_PATH=/no/such/path", "no such folder")
    assert "Hugging Face Hub" in line and "downloading" not in result.stdout  # never sent to the Hub


@pytest.mark.parametrize("name", ["./no-such-model", "../no/such", "~/no-such-model", "org/name/extra"])
def test_path_like_names_are_never_sent_to_the_hub(tmp_path, name):
    result = launch(clean_env(tmp_path, MODEL=name), f"MODEL={name}")
    assert_one_line_error(result, f"MODEL={name}", "no such folder")
    assert "downloading" not in result.stdout


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    result = launch(clean_env(tmp_path, CHECKPOINT_PATH=str(folder)), "folder without config.json")
    assert_one_line_error(result, str(folder), "no config.json")


def test_malformed_config_json(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava",')
    result = launch(clean_env(tmp_path, CHECKPOINT_PATH=str(folder)), "malformed config.json")
    assert_one_line_error(result, str(folder / "config.json"), "not valid JSON")


def test_unknown_model_type(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = launch(clean_env(tmp_path, CHECKPOINT_PATH=str(folder)), "unknown model_type")
    assert_one_line_error(result, str(folder), "model_type='bert'", "BertModel")


def test_config_but_no_weights(tmp_path, demo_checkpoint):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(demo_checkpoint / "config.json", folder / "config.json")
    result = launch(clean_env(tmp_path, CHECKPOINT_PATH=str(folder)), "config.json but no weights")
    assert_one_line_error(result, str(folder), "no weights found")


def test_bad_dtype(tmp_path, demo_checkpoint):
    result = launch(
        clean_env(tmp_path, CHECKPOINT_PATH=str(demo_checkpoint), LLM_DTYPE="fp8"), "LLM_DTYPE=fp8"
    )
    assert_one_line_error(result, "LLM_DTYPE=fp8", "float32")


def test_debug_shows_the_traceback(tmp_path):
    result = launch(
        clean_env(tmp_path, CHECKPOINT_PATH="/no/such/path", MMSERVE_DEBUG="1"), "MMSERVE_DEBUG=1"
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "StartupError" in result.stderr


# ---- ports ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", PORT_VARIABLES)
def test_port_in_use(tmp_path, demo_checkpoint, variable):
    with listening_socket() as port:
        env = clean_env(tmp_path, CHECKPOINT_PATH=str(demo_checkpoint), **{variable: str(port)})
        if variable != "PORT":
            env["PORT"] = "0"
        result = launch(env, f"{variable} in use")
    assert_one_line_error(result, f"{variable}={port}", "in use")


def test_port_not_a_number(tmp_path, demo_checkpoint):
    result = launch(
        clean_env(tmp_path, CHECKPOINT_PATH=str(demo_checkpoint), LLM_PORT="fifty"), "LLM_PORT=fifty"
    )
    assert_one_line_error(result, "LLM_PORT='fifty'", "not a port number")


def test_two_grpc_servers_cannot_share_a_port():
    from mmserve.grpc_util import BindError, start_server

    async def main():
        first, _, port = await start_server(lambda server: None, "test.First", "127.0.0.1", 0, 1 << 20)
        try:
            with pytest.raises(BindError, match=f"127.0.0.1:{port}"):
                await start_server(lambda server: None, "test.Second", "127.0.0.1", port, 1 << 20)
        finally:
            await first.stop(0)

    asyncio.run(main())


# ---- the services' own entry points --------------------------------------------------------------


def test_llm_service_refuses_a_busy_port_before_loading(tmp_path, demo_checkpoint):
    with listening_socket() as port:
        args = [
            sys.executable,
            "-m",
            "llm_service",
            "--checkpoint",
            str(demo_checkpoint),
            "--port",
            str(port),
        ]
        result = run(args, clean_env(tmp_path), "llm_service --port <in use>")
    assert_one_line_error(result, f"LLM_PORT={port}", "in use", prog="llm_service")


@pytest.mark.parametrize("service", ["llm_service", "vision_service"])
def test_service_fails_clearly_when_its_bind_fails_after_loading(tmp_path, demo_checkpoint, service):
    """The port taken while the model loaded (the pre-check skipped here): exit 2, one line, no hang."""
    code = f"import {service}.__main__ as m; m.check_port_free = lambda *a: None; m.main()"
    with listening_socket() as port:
        args = [sys.executable, "-c", code, "--checkpoint", str(demo_checkpoint), "--port", str(port)]
        result = run(args, clean_env(tmp_path), f"{service}: bind fails after loading")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{service}: error: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_vision_service_names_an_unservable_checkpoint(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    args = [
        sys.executable,
        "-m",
        "vision_service",
        "--checkpoint",
        str(folder),
        "--port",
        "0",
    ]
    result = run(args, clean_env(tmp_path), "vision_service on an unknown model_type")
    assert_one_line_error(result, "model_type='bert'", prog="vision_service")


def test_gateway_refuses_a_busy_port(tmp_path, demo_checkpoint):
    with listening_socket() as port:
        args = [sys.executable, "-m", "gateway", "--checkpoint", str(demo_checkpoint), "--port", str(port)]
        result = run(args, clean_env(tmp_path), "gateway --port <in use>")
    assert_one_line_error(result, f"PORT={port}", "in use", prog="gateway")


# ---- inspect ----------------------------------------------------------------------------------------


def test_inspect_demo_checkpoint(tmp_path, demo_checkpoint):
    result = run(
        [sys.executable, "-m", "mmserve", "inspect", str(demo_checkpoint)], clean_env(tmp_path), "inspect"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^family\s+llava\b", out, re.M), out
    assert re.search(r"^tokens/image\s+576\b", out, re.M), out
    assert re.search(r"^dtype\s+float32 in the checkpoint; served as float32", out, re.M), out
    assert re.search(r"^image token id\s+3\s+<image>", out, re.M), out
    assert re.search(r"^context length\s+4096\b", out, re.M), out
    assert "model.safetensors" in out

    result = run(
        [sys.executable, "-m", "mmserve", "inspect", str(demo_checkpoint), "--json"],
        clean_env(tmp_path),
        "inspect --json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "llava" and report["tokens_per_image"] == 576
    assert report["dtype"] == {"checkpoint": "float32", "served_on_cpu": "float32"}
    assert report["weights"][0]["name"] == "model.safetensors" and report["weights"][0]["bytes"] > 0
    assert report["chat_template_content_format"] in (
        "openai",
        "unknown (gateway.chat_template is not available)",
    )


def test_inspect_bad_folder(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2")
    result = run(
        [sys.executable, "-m", "mmserve", "inspect", str(folder)], clean_env(tmp_path), "inspect bad folder"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mmserve inspect: error: ") and "config.json: not valid JSON" in line
    result = run(
        [sys.executable, "-m", "mmserve", "inspect", "/no/such/path"], clean_env(tmp_path), "inspect no path"
    )
    assert result.returncode == 1 and "/no/such/path: no such folder" in result.stderr


# ---- the happy path: internal ports chosen by the launcher ------------------------------------------


def test_launch_without_port_variables_picks_free_ports(tmp_path, demo_checkpoint):
    # PORT is the public one (default 8000, which a shared test machine may not have free): 0 lets the
    # OS bind one; the four internal ports are left unset for the launcher to choose.
    log_path = tmp_path / "server.log"
    env = clean_env(tmp_path, CHECKPOINT_PATH=str(demo_checkpoint), PORT="0")
    started = time.monotonic()
    with launched(env, log_path) as (_, chosen):
        print(f"\n[startup timing] healthy after {time.monotonic() - started:.1f}s")
        text = log_path.read_text()
        assert set(chosen) == set(PORT_VARIABLES), text
        assert len(set(chosen.values())) == 5 and 0 not in chosen.values(), chosen
        assert re.search(r"^  dtype\s+float32\b", text, re.M), text
        metrics = httpx.get(f"http://127.0.0.1:{chosen['LLM_METRICS_PORT']}/metrics", timeout=5)
        assert metrics.status_code == 200 and "mmserve_llm" in metrics.text
        for variable in ("VISION_PORT", "LLM_PORT"):  # the gRPC services listen where the banner says
            with socket.create_connection(("127.0.0.1", chosen[variable]), timeout=5):
                pass
