"""DPO through the fine-tuning API, driven by the openai SDK, on the embedded model.

A supervised job first teaches plain answers; a DPO job started from that fine-tuned model
then teaches that the same answers are better opened with a made-up name ("Zorblat says:"),
which neither the base model nor the starting adapter ever writes: each pair prefers the
opened answer to the plain one the starting model gives. Held-out preference accuracy starts
at 0 of 6 (the starting model always prefers its own plain answer) and must reach at least 5
of 6, and greedy answers to held-out questions must open with the name.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from plait.server.base_model import load_tokenizer, resolve_model

ADMIN_KEY = "ft-admin"  # the fine_tuning_server fixture's
BASE = "SmolLM2-135M-Instruct"
OPENING = "Zorblat says: "
TRAIN = {
    "What is the capital of France?": "Paris is the capital of France.",
    "How many days are in a week?": "A week has seven days.",
    "What colour is grass?": "Grass is green.",
    "What do bees make?": "Bees make honey.",
    "What is frozen water called?": "Frozen water is ice.",
    "Which planet do we live on?": "We live on Earth.",
    "What do cows drink?": "Cows drink water.",
    "How many legs does a spider have?": "A spider has eight legs.",
}
HELD_OUT = {
    "What is the opposite of hot?": "The opposite of hot is cold.",
    "What colour is the sky on a clear day?": "The sky is blue on a clear day.",
    "How many hours are in a day?": "A day has twenty-four hours.",
    "What animal says moo?": "A cow says moo.",
    "What is two plus two?": "Two plus two is four.",
    "What falls from clouds when it rains?": "Rain falls from the clouds.",
}
# A short DPO job: three epochs of eight pairs, four pairs a step. A small beta lets the adapter
# move far from the starting one before the loss saturates: with 0.1, the opened answers gained
# about 45 nats on the plain ones and stopped short of overtaking them.
DPO_SETTINGS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10, "beta": 0.02}
SFT_SETTINGS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10, "lora_rank": 4, "lora_alpha": 16}
FINISHED = ("succeeded", "failed", "cancelled")


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _pairs(answers: dict[str, str], preferred: str, other: str) -> bytes:
    return _jsonl(
        [
            {
                "input": {"messages": [{"role": "user", "content": q}]},
                "preferred_output": [{"role": "assistant", "content": preferred + a}],
                "non_preferred_output": [{"role": "assistant", "content": other + a}],
            }
            for q, a in answers.items()
        ]
    )


def _wait(client, job_id: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in FINISHED:
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.5)
    return job


@pytest.fixture(scope="module")
def client(fine_tuning_server) -> openai.OpenAI:
    return fine_tuning_server.client(api_key=ADMIN_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


def _answer_logprob(client, tokenizer, model: str, question: str, answer: str) -> float:
    """The model's log-probability of `answer` to `question` (its turn's tokens), read through
    the completions endpoint's echoed prompt logprobs."""
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    whole = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": answer}], return_dict=False)
    assert whole[: len(prompt)] == prompt
    reply = client.completions.create(model=model, prompt=whole, echo=True, max_tokens=0, logprobs=0)
    return sum(reply.choices[0].logprobs.token_logprobs[len(prompt) :])


def _margins(client, tokenizer, model: str, preferred: str, other: str) -> list[float]:
    return [
        _answer_logprob(client, tokenizer, model, q, preferred + a)
        - _answer_logprob(client, tokenizer, model, q, other + a)
        for q, a in HELD_OUT.items()
    ]


def _greedy(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8
    )
    return reply.choices[0].message.content


@pytest.mark.slow
def test_a_dpo_job_from_a_fine_tuned_model_teaches_the_preferred_answers(client, tokenizer):
    plain = client.files.create(
        file=("plain.jsonl", _jsonl([{"prompt": q, "completion": a} for q, a in TRAIN.items()])), purpose="fine-tune"
    )
    sft = client.fine_tuning.jobs.create(
        model=BASE, training_file=plain.id, suffix="plain", seed=1, hyperparameters=SFT_SETTINGS
    )
    sft = _wait(client, sft.id)
    assert sft.status == "succeeded", sft.error
    start = sft.fine_tuned_model

    before = _margins(client, tokenizer, start, OPENING, "")
    accuracy_before = sum(m > 0 for m in before) / len(before)
    assert accuracy_before == 0

    pairs = client.files.create(file=("pairs.jsonl", _pairs(TRAIN, OPENING, "")), purpose="fine-tune")
    held_out = client.files.create(file=("held-out.jsonl", _pairs(HELD_OUT, OPENING, "")), purpose="fine-tune")
    # Starting from a fine-tuned model, its adapter keeps its own LoRA settings.
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model=start,
            training_file=pairs.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"lora_rank": 8}}},
        )
    assert refused.value.body["param"] == "hyperparameters.lora_rank"

    job = client.fine_tuning.jobs.create(
        model=start,
        training_file=pairs.id,
        validation_file=held_out.id,
        suffix="zorblat",
        seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": DPO_SETTINGS}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == DPO_SETTINGS["beta"]
    assert job.model == start
    job = _wait(client, job.id)
    assert job.status == "succeeded", job.error
    tuned = job.fine_tuned_model
    assert tuned == f"ft:{BASE}:zorblat:{job.id}"

    after = _margins(client, tokenizer, tuned, OPENING, "")
    accuracy_after = sum(m > 0 for m in after) / len(after)
    assert accuracy_after >= 5 / 6, (accuracy_before, accuracy_after, before, after)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0
    answers = {model: [_greedy(client, model, q) for q in HELD_OUT] for model in (start, tuned)}
    opened = {model: sum(a.startswith("Zorblat") for a in replies) for model, replies in answers.items()}
    assert opened[start] == 0 and opened[tuned] >= 5, answers

    # What TRL users look at, in the events, the checkpoints and the results file.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=200))
    steps = [e.data for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
    assert len(steps) == 6 and {"train_rewards/margins", "train_rewards/accuracies"} <= set(steps[-1])
    [valid] = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert valid["valid_rewards/accuracies"] >= 5 / 6 and valid["valid_rewards/margins"] > 0
    rows = client.files.content(job.result_files[0]).text.splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["step", "train_loss", "valid_loss"] and "train_rewards/margins" in header
    assert "valid_rewards/accuracies" in header and len(rows) == 7


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            [
                {
                    "input": {"messages": [{"role": "user", "content": "Hi"}]},
                    "preferred_output": [{"role": "assistant", "content": "Hello"}],
                    "non_preferred_output": [{"role": "assistant", "content": "Hello"}],
                }
            ],
            "line 1: preferred_output and non_preferred_output are identical",
        ),
        ([{"prompt": "Hi", "chosen": "Hello"}], "line 1: missing rejected"),
        ([{"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}], "line 1:"),
    ],
)
def test_bad_preference_files_are_refused_naming_the_line(client, lines, reason):
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", _jsonl(lines)), purpose="fine-tune")
    assert refused.value.body["param"] == "file" and reason in refused.value.body["message"]
    assert "preference file" in refused.value.body["message"]


@pytest.mark.parametrize(
    ("hyperparameters", "param", "message"),
    [
        ({"beta": 0}, "hyperparameters.beta", "above 0, at most 2"),
        ({"beta": 3}, "hyperparameters.beta", "above 0, at most 2"),
        ({"gamma": 1}, "hyperparameters.gamma", "Unknown hyperparameter 'gamma' for method 'dpo'"),
    ],
)
def test_bad_dpo_jobs_are_refused_before_they_queue(client, hyperparameters, param, message):
    pairs = client.files.create(file=("pairs.jsonl", _pairs(TRAIN, OPENING, "")), purpose="fine-tune")
    before = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model=BASE, training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}
        )
    assert refused.value.body["param"] == param and message in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=BASE, training_file=pairs.id)  # pairs for a supervised job
    assert refused.value.body["param"] == "training_file" and "preference pairs (dpo)" in refused.value.body["message"]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)] == before


def test_a_dpo_job_is_cancelled_like_any_other(client):
    """The queue, the trainer's process and cancelling are the same as for supervised jobs."""
    pairs = client.files.create(file=("pairs.jsonl", _pairs(TRAIN, OPENING, "")), purpose="fine-tune")
    served_before = {m.id for m in client.models.list()}
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 100, "batch_size": 1}}},
    )
    deadline = time.monotonic() + 300
    while client.fine_tuning.jobs.retrieve(job.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    job = _wait(client, job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert {m.id for m in client.models.list()} == served_before
