"""Unit-tier fixtures: the gateway's real app over a scripted LLM (tests/gateway_app.py); a module that
needs another app defines its own fixtures of these names."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from tests.gateway_app import counting_llm, make_app
from tools.checkpoints import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def llm(tokenizer):
    return counting_llm(tokenizer)


@pytest.fixture()
def app(llm):
    return make_app(llm)


@pytest.fixture()
def http(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def client(http):
    """The official openai client over `http` (the module's app)."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
