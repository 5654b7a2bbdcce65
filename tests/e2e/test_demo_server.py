"""`make run`'s default: the env-started stack on the offline demo checkpoint serves a request; Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai

from tests.helpers import ROOT, data_url, free_ports, make_image


def test_demo_stack_serves_and_stops_on_ctrl_c(tmp_path):
    port, vision_port, llm_port, metrics, vision_metrics = free_ports(5)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHECKPOINT_PATH", "MODEL", "MODEL_TYPE", "TOKENIZER_PATH")
    }
    env.update(
        MMSERVE_HOME=str(tmp_path / "home"),
        PORT=str(port),
        VISION_PORT=str(vision_port),
        LLM_PORT=str(llm_port),
        LLM_METRICS_PORT=str(metrics),
        VISION_METRICS_PORT=str(vision_metrics),
    )
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmserve.start_server"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError(
                "demo stack did not become healthy:\n" + (tmp_path / "server.log").read_text()
            )
        assert "DEMO checkpoint" in (tmp_path / "server.log").read_text()
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        image = data_url(make_image(64, 48, seed=7))
        response = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
            max_tokens=8,
        )
        # The demo keeps LLaVA-1.5's geometry: 576 placeholder tokens per image.
        assert response.usage.prompt_tokens > 576
        assert response.usage.completion_tokens >= 1
        assert "mmserve_llm_generated_tokens_total" in httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code in (0, -signal.SIGINT, 130), (tmp_path / "server.log").read_text()
    for service_port in (port, vision_port, llm_port):  # gateway, vision and llm all exited
        out = subprocess.run(["pgrep", "-f", f"--port {service_port}"], capture_output=True, text=True)
        assert out.stdout.strip() == "", f"a service on port {service_port} outlived the launcher"
