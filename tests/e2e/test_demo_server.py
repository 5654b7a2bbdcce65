"""`make run`'s default: the demo checkpoint built by `python -m tools.demo`, then the env-started stack
on it (OS-chosen ports, read back from the banner) serves a request; Ctrl-C stops it."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.helpers import ROOT, data_url, launched, make_image

MAKE_RUN_DEFAULTS = ("CHECKPOINT_PATH", "MODEL", "MODEL_TYPE", "TOKENIZER_PATH")


def test_demo_stack_serves_and_stops_on_ctrl_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in MAKE_RUN_DEFAULTS}
    env["MMSERVE_HOME"] = str(tmp_path / "home")
    # what `make run` does with no MODEL: stdout is the folder alone
    built = subprocess.run(
        [sys.executable, "-m", "tools.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(tmp_path / "home" / "demo-llava"), built.stdout
    env.update(CHECKPOINT_PATH=built.stdout.strip(), PORT="0")
    log = tmp_path / "server.log"
    with launched(env, log) as (launcher, ports):
        assert "DEMO checkpoint" in log.read_text()
        base = f"http://127.0.0.1:{ports['PORT']}"
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
        metrics = httpx.get(f"http://127.0.0.1:{ports['LLM_METRICS_PORT']}/metrics", timeout=5).text
        assert "mmserve_llm_generated_tokens_total" in metrics
    # the launcher ran in a process group of its own: none of gateway, vision or llm outlived it
    with pytest.raises(ProcessLookupError):
        os.killpg(launcher.pid, 0)
