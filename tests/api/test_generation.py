"""Chat and text completions through the official OpenAI SDK against a live server."""

from __future__ import annotations

import math

import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_base_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert models[0].owned_by == "plait"


def test_chat_answers_with_usage(client, server):
    r = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_max_tokens_ends_with_length(client, server):
    r = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_model_may_be_omitted(server):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == server.model


def test_streaming_matches_non_streaming(client, server):
    args = dict(model=server.model, messages=QUESTION, max_tokens=32, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len(chunks) > 5  # really streamed, not one blob


def test_stream_ends_with_done(server):
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_logprobs_are_the_models_distribution(client, server):
    r = client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one, and probabilities stay below 1.
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])
        assert sum(math.exp(x) for x in tops) <= 1.0 + 1e-4
        assert bytes(t.bytes).decode() == t.token


def test_no_logprobs_unless_asked(client, server):
    r = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


def test_stop_sequence_cuts_the_answer(client, server):
    args = dict(model=server.model, messages=QUESTION, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**args).choices[0].message.content
    assert "Paris" in full
    cut = client.chat.completions.create(**args, stop=["Paris", "zzz"]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index("Paris")]
    streamed = client.chat.completions.create(**args, stop="Paris", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_seed_makes_sampling_repeatable(client, server):
    args = dict(model=server.model, messages=QUESTION, max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(**args, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**args, seed=1234).choices[0].message.content
    others = {client.chat.completions.create(**args, seed=s).choices[0].message.content for s in range(5)}
    assert a == b
    assert len(others) > 1  # sampling is really random across seeds


def test_text_completion_with_logprobs(client, server):
    r = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert "Paris" in choice.text
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_text_completion_streams_and_takes_token_ids(client, server):
    ids_prompt = client.completions.create(model=server.model, prompt=[504, 3575, 282], max_tokens=4, temperature=0)
    assert ids_prompt.usage.prompt_tokens == 3
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=server.model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
        )
    )
    whole = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert text == whole.choices[0].text and len(text) > 0


def test_health_and_metrics(server, client):
    with server.http() as http:
        health = http.get("/health").json()
        assert health["status"] == "ok"
        metrics = http.get("/metrics").text
    for name in (
        "plait_requests_total",
        "plait_time_to_first_token_seconds",
        "plait_kv_blocks_used",
        "plait_requests_waiting",
        "plait_generation_tokens_total",
    ):
        assert name in metrics


def test_a_shared_system_prompt_is_read_once_and_reported_cached(client, server):
    system = {"role": "system", "content": "You answer in one short sentence, politely and precisely. " * 8}
    hits_before = server.metric("vllm:prefix_cache_hits_total")
    first = client.chat.completions.create(
        model=server.model, messages=[system, {"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    second = client.chat.completions.create(
        model=server.model, messages=[system, {"role": "user", "content": "Hello"}], max_tokens=3, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    assert server.metric("vllm:prefix_cache_hits_total") - hits_before == cached
    assert server.metric("vllm:prefix_cache_queries_total") >= first.usage.prompt_tokens + second.usage.prompt_tokens
