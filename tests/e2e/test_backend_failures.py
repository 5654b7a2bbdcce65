"""The gateway with an API key, and with a backend that goes away."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import Stack


def test_api_key_and_llm_outage(tiny_checkpoint, tmp_path):
    stack = Stack(tiny_checkpoint, tmp_path, ["--api-key", "sekret", "--max-request-bytes", "100000"]).start()
    try:
        messages = [{"role": "user", "content": "hello"}]
        anonymous = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=2)
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="sekret", max_retries=0, timeout=30)
        assert client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=2).choices

        big = [{"role": "user", "content": "x" * 200_000}]
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="tiny-llava", messages=big, max_tokens=2)
        assert info.value.status_code == 413 and "100000 byte limit" in info.value.body["message"]

        stack.procs["llm"].kill()
        stack.procs["llm"].wait()
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=2)
        assert info.value.status_code == 503
        assert "llm service is unavailable" in info.value.body["message"]
        health = httpx.get(stack.base_url + "/health", timeout=10)
        assert health.status_code == 503 and "llm" in health.json()["backends"]
        assert stack.procs["gateway"].poll() is None
    finally:
        stack.stop()
