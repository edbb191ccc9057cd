"""With --api-key set, inference needs the key; health stays open for probes."""

from __future__ import annotations

import openai
import pytest


def test_api_key_is_required_when_configured(launch_server):
    server = launch_server("--api-key", "sekret")
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong", max_retries=0).chat.completions.create(model=server.model, messages=messages)
    assert info.value.code == "invalid_api_key"
    with server.http() as http:
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/completions", json={"prompt": "x"}).json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200
    ok = server.client(api_key="sekret").chat.completions.create(model=server.model, messages=messages, max_tokens=2)
    assert ok.usage.completion_tokens > 0
