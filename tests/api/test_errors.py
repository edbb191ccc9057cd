"""Everything a client can get wrong is a 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import openai
import pytest

OK_MESSAGES = [{"role": "user", "content": "hi"}]


def assert_openai_error(response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param != "any":
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
        ({"messages": OK_MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": OK_MESSAGES, "temperature": 3.5}, "temperature"),
        ({"messages": OK_MESSAGES, "top_p": -0.1}, "top_p"),
        ({"messages": OK_MESSAGES, "max_tokens": "10"}, "max_tokens"),
        ({"messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": OK_MESSAGES, "max_tokens": -5}, "max_tokens"),
        ({"messages": OK_MESSAGES, "stream": "yes"}, "stream"),
        ({"messages": OK_MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": OK_MESSAGES, "n": 9}, "n"),
        ({"messages": OK_MESSAGES, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ],
)
def test_malformed_chat_requests_are_400(server, body, param):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    error = assert_openai_error(r, 400, param)
    assert error["type"] == "invalid_request_error"


def test_bad_json_is_400(server):
    with server.http() as http:
        r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]


def test_body_that_is_not_an_object_is_400(server):
    with server.http() as http:
        assert_openai_error(http.post("/v1/chat/completions", json=[1, 2, 3]), 400)


def test_absurd_max_tokens_is_400_naming_the_context(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=OK_MESSAGES, max_tokens=10**9)
    assert info.value.code == "context_length_exceeded"
    assert "context length" in info.value.message


def test_prompt_longer_than_the_context_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt="word " * 9000, max_tokens=1)
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=OK_MESSAGES)
    assert info.value.code == "model_not_found"
    assert "no-such-model" in info.value.message


@pytest.mark.parametrize("prompt", ["", [], [10**7]])
def test_bad_completion_prompts_are_400(server, prompt):
    with server.http() as http:
        assert_openai_error(http.post("/v1/completions", json={"prompt": prompt}), 400, "prompt")


def test_unknown_route_is_404_json(server):
    with server.http() as http:
        assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_wrong_method_is_405_json(server):
    with server.http() as http:
        assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_oversized_body_is_413(server):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * (9 << 20)}]})
    assert_openai_error(r, 413)


def test_server_still_serves_after_bad_requests(client, server):
    r = client.chat.completions.create(model=server.model, messages=OK_MESSAGES, max_tokens=2)
    assert r.choices[0].message.content is not None
