"""The gateway's structured-output checks that the official client cannot send: a schema holding
Python json's NaN / Infinity literals (raw bytes to the real app, conftest's scripted LLM behind it)."""

from __future__ import annotations

import json

from tests.unit.test_api import MODEL


def test_a_schema_with_infinity_is_a_400_naming_it(http, llm):
    schema = {"type": "number", "maximum": "INF"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "structured_outputs": {"json": schema},
    }
    body = json.dumps(body).replace('"INF"', "Infinity")  # Python's json reads the literal
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "structured_outputs.json" and "NaN or an infinity" in error["message"], error
    assert llm.requests == []
