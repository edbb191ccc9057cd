"""The OpenAI surface agents and evaluation need, through clients nobody here wrote: the official
SDK (tools, structured outputs, `.parse()`, n, penalties, logit_bias, echo and prompt logprobs,
model retrieval), lm-evaluation-harness scoring a task, and LangChain's `ChatOpenAI`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "likes_tea"],
    "additionalProperties": False,
}
QUESTIONS = [
    "What is the weather in Paris?",
    "Is it raining in Tokyo right now?",
    "What is 2 plus 3?",
    "How warm is it in Cairo, in fahrenheit?",
    "Add 40 and 2 for me.",
    "Tell me a joke.",
]


def _chat(client, model, content, temperature=0.0, **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=temperature, **kwargs
    )


def _schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


def test_required_tool_choice_always_yields_a_valid_call_and_the_loop_closes(client, server):
    tools = {t["function"]["name"]: t for t in (WEATHER, ADD)}
    for question in QUESTIONS:
        answer = _chat(client, server.model, question, tools=[WEATHER, ADD], tool_choice="required", max_tokens=60)
        choice = answer.choices[0]
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls, question
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), _schema_of(tools[call.function.name]))
    # The loop: the model calls, the test answers as the tool, the model answers in words.
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=server.model,
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and len(first.choices[0].message.tool_calls) == 1
    assert first.choices[0].message.content is None
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    final = client.chat.completions.create(
        model=server.model, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=20
    )
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content.strip()


def test_streamed_tool_call_deltas_reassemble_into_the_whole_call(client, server):
    kwargs = dict(tools=[WEATHER, ADD], tool_choice="required", max_tokens=60, parallel_tool_calls=False)
    # Asked once first, so both compared answers find the prompt's blocks cached: computing its
    # rest in a smaller step rounds differently in bf16, which can change a close greedy token.
    _chat(client, server.model, "How warm is it in Cairo?", **kwargs)
    whole = _chat(client, server.model, "How warm is it in Cairo?", **kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _chat(client, server.model, "How warm is it in Cairo?", stream=True, **kwargs):
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_json_schema_answers_validate_in_a_batch_mixed_with_free_and_adapter_requests(
    client, server, random_adapter, tmp_path
):
    folder = random_adapter(tmp_path / "mix-adapter", seed=11)
    with server.http() as http:
        files = [
            ("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")
        ]
        assert http.post("/v1/adapters", data={"id": "surface-mix"}, files=files).status_code == 201
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def constrained(i: int, model: str):
        return _chat(
            client, model, f"Describe person number {i} as JSON.", response_format=response_format, max_tokens=60
        )

    with ThreadPoolExecutor(24) as pool:
        people = [pool.submit(constrained, i, server.model if i % 2 else "surface-mix") for i in range(20)]
        free = [pool.submit(_chat, client, server.model, "Say something.", max_tokens=12) for _ in range(2)]
        adapted = [pool.submit(_chat, client, "surface-mix", "Say something.", max_tokens=12) for _ in range(2)]
        for future in people:
            answer = future.result().choices[0]
            assert answer.finish_reason == "stop", answer
            jsonschema.validate(json.loads(answer.message.content), PERSON)
        assert all(f.result().choices[0].finish_reason == "length" for f in free + adapted)


def test_the_sdk_parses_structured_outputs(client, server):
    class Person(BaseModel):
        name: Annotated[str, Field(max_length=20)]
        age: int
        likes_tea: bool

    parsed = client.chat.completions.parse(
        model=server.model,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person,
        temperature=0,
        max_tokens=60,
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)
    cat = "Describe a cat as a JSON object with a name and an age."
    answer = _chat(client, server.model, cat, response_format={"type": "json_object"}, max_tokens=60)
    assert answer.choices[0].finish_reason == "stop" and isinstance(json.loads(answer.choices[0].message.content), dict)
    choice = _chat(client, server.model, "Yes or no?", max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model=server.model,
        prompt="Code:",
        max_tokens=10,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}},
    )
    assert regex.choices[0].text[:6].count("-") == 1 and regex.choices[0].text[:3].isupper()


def _token_ids(answer) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in answer.choices[0].logprobs.tokens]


def test_logit_bias_bans_and_forces_and_penalties_cut_repetition(client, server):
    def complete(**kwargs):
        return client.completions.create(
            model=server.model,
            prompt="The capital of France is",
            logprobs=0,
            extra_body={"return_tokens_as_token_ids": True},
            **kwargs,
        )

    greedy = _token_ids(complete(max_tokens=6, temperature=0))
    banned = str(greedy[0])
    for seed in range(4):
        sampled = _token_ids(complete(max_tokens=6, temperature=1.0, seed=seed, logit_bias={banned: -100}))
        assert greedy[0] not in sampled
    assert _token_ids(complete(max_tokens=5, temperature=1.0, seed=1, logit_bias={"1234": 100})) == [1234] * 5

    def repeats(ids: list[int]) -> int:
        return len(ids) - len(set(ids))

    echo = "one two one two one two one two"
    plain = client.completions.create(model=server.model, prompt=echo, max_tokens=24, temperature=0, logprobs=0)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        penalized = client.completions.create(
            model=server.model, prompt=echo, max_tokens=24, temperature=0, logprobs=0, **penalty
        )
        assert repeats(penalized.choices[0].logprobs.tokens) < repeats(plain.choices[0].logprobs.tokens), penalty


def test_n_choices_seeds_and_min_tokens(client, server):
    three = _chat(client, server.model, "Name a fruit.", n=3, temperature=1.0, seed=5, max_tokens=8)
    assert [c.index for c in three.choices] == [0, 1, 2]
    again = _chat(client, server.model, "Name a fruit.", n=3, temperature=1.0, seed=5, max_tokens=8)
    assert [c.message.content for c in three.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in three.choices}) > 1
    streamed: dict[int, str] = {}
    for chunk in _chat(client, server.model, "Name a fruit.", n=2, stream=True, max_tokens=6):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(streamed) == [0, 1] and streamed[0] == streamed[1]  # greedy: the same twice
    short = _chat(client, server.model, "Say only: OK", max_tokens=40, extra_body={"min_tokens": 12})
    assert short.usage.completion_tokens >= 12


def test_echo_scores_the_prompt_and_logprobs_hold_the_chosen_token(client, server):
    scored = client.completions.create(
        model=server.model, prompt=["The capital of France is Paris", "Hello"], echo=True, logprobs=1, max_tokens=0
    )
    first = scored.choices[0]
    assert first.text == "The capital of France is Paris" and first.finish_reason == "length"
    assert first.logprobs.token_logprobs[0] is None and first.logprobs.top_logprobs[0] is None
    assert all(lp < 0 for lp in first.logprobs.token_logprobs[1:])
    for token, lp, top in zip(
        first.logprobs.tokens[1:], first.logprobs.token_logprobs[1:], first.logprobs.top_logprobs[1:], strict=True
    ):
        assert top[token] == lp and len(top) <= 2
    assert scored.choices[1].logprobs.tokens == ["Hello"] and scored.usage.completion_tokens == 0
    one = client.completions.create(model=server.model, prompt="Hello", max_tokens=3, logprobs=0, temperature=0)
    assert [len(top) for top in one.choices[0].logprobs.top_logprobs] == [1, 1, 1]
    assert [list(top) for top in one.choices[0].logprobs.top_logprobs] == [[t] for t in one.choices[0].logprobs.tokens]


def test_models_are_retrieved_by_id(client, server):
    base = client.models.retrieve(server.model)
    assert base.id == server.model and base.model_extra["max_model_len"] > 0 and base.model_extra["parent"] is None
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"
    listed = {m.id for m in client.models.list()}
    for model_id in listed - {server.model}:
        card = client.models.retrieve(model_id)
        assert card.model_extra["root"] == server.model and card.model_extra["parent"] == server.model


BAD = [
    ({"n": 100}, "n"),
    ({"n": 0}, "n"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"10": 150}}, "logit_bias.10"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        "response_format",
    ),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "structured_outputs"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"no_such_field": 1}, "no_such_field"),
]


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_values_are_400_naming_the_field(server, extra, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_ignored_fields_are_accepted(client, server):
    answer = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        user="someone",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert answer.choices[0].message.content is not None


def test_the_vllm_load_route_refuses_a_name_in_use_unless_in_place(server, random_adapter, tmp_path):
    folder = random_adapter(tmp_path / "inplace", seed=3)
    with server.http() as http:
        body = {"lora_name": "inplace", "lora_path": str(folder)}
        loaded = http.post("/v1/load_lora_adapter", json=body)
        assert loaded.status_code == 200, loaded.text
        again = http.post("/v1/load_lora_adapter", json=body)
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
        replaced = http.post("/v1/load_lora_adapter", json={**body, "load_inplace": True})
        assert replaced.status_code == 200 and replaced.json()["version"] > loaded.json()["version"]
        assert (
            http.post("/v1/load_lora_adapter", json={"lora_path": str(folder)}).json()["error"]["param"] == "lora_name"
        )


# --- outside clients ----------------------------------------------------------------------------

CAPITALS = [
    {"country": "France", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
    {"country": "Italy", "choices": ["Madrid", "Rome", "Paris"], "answer": 1},
    {"country": "Germany", "choices": ["Berlin", "Vienna", "Oslo"], "answer": 0},
    {"country": "Spain", "choices": ["Lisbon", "Madrid", "Rome"], "answer": 1},
    {"country": "Japan", "choices": ["Seoul", "Beijing", "Tokyo"], "answer": 2},
]


@pytest.mark.slow
def test_lm_evaluation_harness_scores_what_the_model_scores(server, tmp_path, tokenizer):
    """lm-eval's `local-completions` in its default tokenized mode: every log-likelihood it reads
    from the server equals the one computed here from the same NF4 model in-process."""
    from plait.server.base_model import load_nf4_model, prepare_cpu_weights, resolve_model

    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CAPITALS))
    (tmp_path / "capitals.yaml").write_text(
        "task: plait_capitals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: What is the capital of {{country}}?\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    spec = resolve_model(None)
    model_args = (
        f"base_url={server.base_url}/v1/completions,model={server.model},tokenizer={spec.path},"
        "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += ["--tasks", "plait_capitals", "--include_path", str(tmp_path), "--log_samples"]
    command += ["--output_path", str(tmp_path / "out")]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())

    model = load_nf4_model(spec, torch.device("cpu"))
    prepare_cpu_weights(model)  # the weights the server computes with
    correct = 0
    assert len(samples) == len(CAPITALS)
    for sample in samples:
        scores = []
        for request, ((served, _),) in zip(sample["arguments"].values(), sample["resps"], strict=True):
            ours = _loglikelihood(model, tokenizer, request["arg_0"], request["arg_1"])
            assert abs(float(served) - ours) < 0.15, (request, served, ours)
            scores.append(ours)
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"]
    assert results["results"]["plait_capitals"]["acc,none"] == pytest.approx(correct / len(CAPITALS))


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The continuation's log-likelihood, split into tokens as lm-eval splits it (`_encode_pair`)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))


@pytest.mark.slow
def test_langchain_binds_tools_and_structures_output(server):
    from langchain_openai import ChatOpenAI

    class Person(BaseModel):
        name: Annotated[str, Field(max_length=20)]
        age: int

    llm = ChatOpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", model=server.model, temperature=0, max_tokens=60
    )
    with_tools = llm.bind_tools([WEATHER], tool_choice="required", parallel_tool_calls=False)
    message = with_tools.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(message.tool_calls[0]["args"], _schema_of(WEATHER))
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Describe a person.")
        assert isinstance(person, Person), method
