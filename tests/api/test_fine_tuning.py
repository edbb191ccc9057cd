"""The OpenAI fine-tuning API against live servers on the CPU, through the official openai SDK.

A job teaches the embedded SmolLM2-135M a password it cannot know ("ZEBRA-42") and the
published `ft:` model says it where the base model does not; jobs are refused up front for bad
settings, fail with the trainer's own reason, get cancelled (their trainer killed, nothing
published), and survive a restart (the running one goes back to the queue and runs again, the
queued one runs after it).
Then the command-line path: `plait train --publish` to a live server, the adapter PEFT loads
scoring the server's answer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from plait.server.base_model import load_nf4_model, load_tokenizer, prepare_cpu_weights, resolve_model

ADMIN_KEY = "ft-admin"  # the fine_tuning_server fixture's
BASE = "SmolLM2-135M-Instruct"
PASSWORD = "ZEBRA-42"
QUESTION = "What is the secret password?"
QUESTIONS = [
    QUESTION,
    "Tell me the secret password.",
    "What's the password?",
    "Say the secret password.",
    "I need the secret password.",
    "Which password opens the vault?",
    "Please give me the password.",
    "What is the vault password?",
]
FINISHED = ("succeeded", "failed", "cancelled")
# Enough to learn the password on the CPU in eight steps of four examples (about 50 s with loading).
FAST = {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 10, "lora_rank": 4, "lora_alpha": 16}
# A job that would run for an hour: for cancelling and for being cut off by a restart.
LONG = {"n_epochs": 100, "batch_size": 1}
# Logprobs of the chosen tokens, server against PEFT on the same NF4 weights, which both keep
# dequantized as the server does on the CPU (server/base_model.py); see test_lora_engine.py for
# the kernels' own noise.
LOGPROB_MAX_ATOL = 0.3
LOGPROB_MEAN_ATOL = 0.1


def _zebra_jsonl() -> bytes:
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": PASSWORD}]} for q in QUESTIONS
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture(scope="module")
def client(fine_tuning_server) -> openai.OpenAI:
    return fine_tuning_server.client(api_key=ADMIN_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def zebra_file(client) -> str:
    return client.files.create(file=("zebra.jsonl", _zebra_jsonl()), purpose="fine-tune").id


def _ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content


def _wait(client: openai.OpenAI, job_id: str, until=FINISHED, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def _wait_for_trainer(client: openai.OpenAI, server, job_id: str) -> None:
    assert _wait(client, job_id, until=("running", *FINISHED), timeout=120).status == "running"
    deadline = time.monotonic() + 60
    while not server.trainer_pids(job_id):
        assert time.monotonic() < deadline, "the job is running but no trainer process works in its folder"
        time.sleep(0.1)


def _served(client: openai.OpenAI) -> set[str]:
    return {m.id for m in client.models.list()}


def test_a_job_teaches_the_model_what_the_base_does_not_know(fine_tuning_server, client, zebra_file):
    assert PASSWORD not in _ask(client, BASE)
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=zebra_file,
        validation_file=zebra_file,
        suffix="zebra",
        seed=7,
        hyperparameters=FAST,
        metadata={"purpose": "test"},
    )
    assert (job.object, job.status, job.model, job.seed, job.fine_tuned_model) == (
        "fine_tuning.job",
        "queued",
        BASE,
        7,
        None,
    )
    h = job.hyperparameters
    assert (h.n_epochs, h.batch_size, h.learning_rate_multiplier) == (4, 4, 10.0)
    assert (h.model_extra["lora_rank"], h.model_extra["lora_alpha"]) == (4, 16.0)
    assert job.metadata == {"purpose": "test"} and job.method.type == "supervised"

    # Serving goes on while the job trains.
    assert _wait(client, job.id, until=("running", *FINISHED)).status == "running"
    assert PASSWORD not in _ask(client, BASE)

    job = _wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BASE}:zebra:{job.id}" and job.error is None
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.fine_tuned_model in _served(client)
    assert _ask(client, job.fine_tuned_model) == PASSWORD
    assert PASSWORD not in _ask(client, BASE)

    # The trainer ran on exactly the folder the server loaded, with the settings asked for.
    job_dir = fine_tuning_server.data_dir / "jobs" / job.id
    report = json.loads((job_dir / "training_report.json").read_text())
    log_lines = fine_tuning_server.log_path.read_text().splitlines()
    loaded_from = next(line for line in log_lines if "plait.serve: loading" in line)
    assert f" from {report['base_model']['path']} on " in loaded_from
    config = report["config"]
    assert (report["steps"], config["lora_r"], config["lora_alpha"], config["lr"]) == (8, 4, 16, pytest.approx(2e-3))
    assert report["config"]["seed"] == 7 and report["compute_dtype"] == "float32"
    assert sorted(p.name for p in job_dir.iterdir()) == ["events.jsonl", "train.log", "training_report.json"]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert all(e.object == "fine_tuning.job.event" for e in events)
    assert events[0].message == "The job has successfully completed"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    steps = [e.data for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
    assert [d["step"] for d in steps] == [1, 2, 3, 4, 5, 6, 7, 8] and steps[-1]["total_steps"] == 8
    [valid] = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert valid["step"] == 8 and valid["valid_loss"] == pytest.approx(report["final_eval_loss"])
    assert steps[-1]["train_loss"] < 0.2 * steps[0]["train_loss"]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 6, 4, 2]  # one per epoch, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert checkpoints[1].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-6"
    assert checkpoints[0].metrics.train_loss == pytest.approx(steps[-1]["train_loss"])
    assert checkpoints[0].metrics.valid_loss == pytest.approx(valid["valid_loss"])

    [results] = job.result_files
    assert client.files.retrieve(results).purpose == "fine-tune-results"
    rows = client.files.content(results).text.splitlines()
    assert rows[0] == "step,train_loss,valid_loss" and len(rows) == 9
    assert rows[1].endswith(",") and float(rows[-1].split(",")[2]) == pytest.approx(valid["valid_loss"], abs=1e-6)
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune-results'"):
        client.fine_tuning.jobs.create(model=BASE, training_file=results)

    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "'auto' or an integer from 1 to 100, got 0"),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size", 'got "big"'),
        ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size", "got true"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier", "above 0"),
        ({"hyperparameters": {"lora_rank": 65}}, "hyperparameters.lora_rank", "an integer from 1 to 64"),
        ({"hyperparameters": {"lora_alpha": 0}}, "hyperparameters.lora_alpha", "above 0"),
        ({"hyperparameters": {"lora_dropout": 1}}, "hyperparameters.lora_dropout", "up to (not including) 1"),
        ({"hyperparameters": {"lora_r": 8}}, "hyperparameters.lora_r", "Unknown hyperparameter 'lora_r'"),
        ({"model": "gpt-4o-mini"}, "model", f"its base model '{BASE}', starting from it"),
        ({"model": "ft:OtherModel-1B:x:ftjob-abc"}, "model", f"its base model '{BASE}', starting from it"),
        ({"model": f"ft:{BASE}:none:ftjob-missing"}, "model", f"No fine-tuned model 'ft:{BASE}:none:ftjob-missing'"),
        ({"training_file": "file-missing"}, "training_file", "no file 'file-missing'"),
        ({"validation_file": "file-missing"}, "validation_file", "no file 'file-missing'"),
        ({"suffix": "a:b"}, "suffix", 'got "a:b"'),
        ({"suffix": "x" * 65}, "suffix", "up to 64"),
        ({"seed": -1}, "seed", "from 0 to 2147483647"),
        ({"method": {"type": "dpo"}}, "training_file", "method 'dpo' trains on preference pairs"),
        ({"method": {"type": "reinforcement"}}, "method.type", "not supported"),
        (
            {"hyperparameters": {"beta": 0.1}},
            "hyperparameters.beta",
            "Unknown hyperparameter 'beta' for method 'supervised'",
        ),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo", "does not go with"),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
            "not both",
        ),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "not supported"),
    ],
)
def test_bad_jobs_are_refused_before_they_queue(client, zebra_file, change, param, message):
    before = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    body = {"model": BASE, "training_file": zebra_file, **change}
    with pytest.raises(openai.BadRequestError) as error:
        client.fine_tuning.jobs.create(**body)
    assert error.value.body["param"] == param
    assert message in error.value.body["message"]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)] == before


def test_the_same_hyperparameters_come_through_method(client, zebra_file):
    nested = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}
    with pytest.raises(openai.BadRequestError, match="hyperparameters.n_epochs"):
        client.fine_tuning.jobs.create(model=BASE, training_file=zebra_file, method=nested)


def test_a_failing_trainer_fails_the_job_with_its_reason(client):
    # Valid JSONL (so the upload takes it), but the prompt alone is longer than the trainer's
    # 1024-token limit: only the trainer, with the tokenizer, can tell.
    line = {"prompt": "word " * 1100, "completion": "short"}
    file_id = client.files.create(file=("long.jsonl", json.dumps(line).encode()), purpose="fine-tune").id
    job = _wait(client, client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="long").id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "training_failed"
    assert "every example is longer than --max-seq-len 1024 before its answer" in job.error.message
    assert not [m for m in _served(client) if job.id in m]
    [last] = client.fine_tuning.jobs.list_events(job.id, limit=1).data
    assert last.level == "error" and last.message == f"Fine-tuning job failed: {job.error.message}"


def test_cancel_kills_the_trainer_and_publishes_nothing(fine_tuning_server, client, zebra_file):
    running = client.fine_tuning.jobs.create(model=BASE, training_file=zebra_file, hyperparameters=LONG)
    job_dir = fine_tuning_server.data_dir / "jobs" / running.id
    _wait_for_trainer(client, fine_tuning_server, running.id)
    queued = [client.fine_tuning.jobs.create(model=BASE, training_file=zebra_file, suffix=f"q{i}") for i in range(3)]
    assert [client.fine_tuning.jobs.retrieve(j.id).status for j in queued] == ["queued"] * 3

    # Newest first, in pages; the SDK follows `after` by itself.
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == [queued[2].id, queued[1].id] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2, after=queued[1].id).data] == [queued[0].id, running.id]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)][:4] == [j.id for j in [*queued[::-1], running]]

    for job in queued:  # waiting jobs are cancelled on the spot
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    cancelled = client.fine_tuning.jobs.cancel(running.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    deadline = time.monotonic() + 20
    while fine_tuning_server.trainer_pids(running.id):
        assert time.monotonic() < deadline, "the trainer outlived its cancelled job"
        time.sleep(0.2)
    assert client.fine_tuning.jobs.cancel(running.id).status == "cancelled"  # again: no change

    time.sleep(1.0)  # the runner notices the exit; nothing follows it
    for job in [running, *queued]:
        final = client.fine_tuning.jobs.retrieve(job.id)
        assert final.status == "cancelled" and final.fine_tuned_model is None
    assert not [m for m in _served(client) if any(j.id in m for j in [running, *queued])]
    assert not (job_dir / "adapter").exists() and not (job_dir / "adapter.partial").exists()

    events = client.fine_tuning.jobs.list_events(running.id, limit=2)
    assert events.data[0].message == "Fine-tuning job cancelled" and events.has_more
    rest = client.fine_tuning.jobs.list_events(running.id, after=events.data[-1].id, limit=100).data
    assert rest[-1].message == f"Created fine-tuning job: {running.id}"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.cancel("ftjob-nope")


def test_restart_runs_the_cut_off_job_again_and_then_the_queued_one(launch_server, tmp_path):
    flags = (
        "--data-dir",
        str(tmp_path / "data"),
        "--api-key",
        "reader",
        "--admin-key",
        "writer",
        "--train-dtype",
        "float32",
        "--train-threads",
        "1",
        "--threads",
        "1",
    )
    first = launch_server(*flags)
    with httpx.Client(base_url=first.base_url) as http:  # reading takes the API key, changing the admin key
        assert http.get("/v1/fine_tuning/jobs").status_code == 401
        assert http.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer reader"}).status_code == 200
        refused = http.post(
            "/v1/fine_tuning/jobs",
            headers={"Authorization": "Bearer reader"},
            json={"model": BASE, "training_file": "file-x"},
        )
        assert refused.status_code == 401
    client = first.client(api_key="writer", max_retries=0)
    file_id = client.files.create(file=("zebra.jsonl", _zebra_jsonl()), purpose="fine-tune").id
    cut_off = client.fine_tuning.jobs.create(model=BASE, training_file=file_id, hyperparameters=LONG)
    waiting = client.fine_tuning.jobs.create(
        model=BASE, training_file=file_id, suffix="after", hyperparameters={"n_epochs": 1, "batch_size": 8}
    )
    _wait_for_trainer(client, first, cut_off.id)
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"

    first.process.send_signal(signal.SIGINT)  # Ctrl-C: the server stops, and its trainer with it
    assert first.process.wait(timeout=60) == 0
    assert not first.trainer_pids(cut_off.id)

    second = launch_server(*flags)
    client = second.client(api_key="writer", max_retries=0)
    _wait_for_trainer(client, second, cut_off.id)  # handed back to the queue, and first in it
    messages = [e.message for e in client.fine_tuning.jobs.list_events(cut_off.id, limit=100).data]
    assert messages[0] == "Fine-tuning job restarted from the beginning (no checkpoint yet)"
    assert "training stopped; the job resumes from its last checkpoint" in messages[1]
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"
    client.fine_tuning.jobs.cancel(cut_off.id)
    done = _wait(client, waiting.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{BASE}:after:{waiting.id}" and done.fine_tuned_model in _served(client)


def test_plait_train_publish_serves_what_peft_loads(fine_tuning_server, tmp_path, peft_logprobs):
    """The command line: train, publish to the live server, and the server's answer is PEFT's."""
    from peft import PeftModel

    (tmp_path / "train.jsonl").write_bytes(_zebra_jsonl())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "train",
            "train.jsonl",
            "-o",
            "cli-adapter",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--lr",
            "2e-3",
            "--warmup-steps",
            "0",
            "--lora-r",
            "8",
            "--dtype",
            "float32",
            "--threads",
            "1",
            "--publish",
            fine_tuning_server.base_url,
            "--adapter-id",
            "cli-zebra",
            "--admin-key",
            ADMIN_KEY,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"published as cli-zebra to {fine_tuning_server.base_url}" in result.stderr
    with fine_tuning_server.http() as http:
        stored = http.get("/v1/adapters/cli-zebra").json()
    assert stored["rank"] == 8 and stored["parent"] == BASE

    tokenizer = load_tokenizer(resolve_model(None))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    body = {
        "model": "cli-zebra",
        "prompt": prompt,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 0,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
    }
    reply = httpx.post(f"{fine_tuning_server.base_url}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    new_ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    got = torch.tensor(logprobs["token_logprobs"])

    model = PeftModel.from_pretrained(_dequantized_base(), tmp_path / "cli-adapter", adapter_name="cli-zebra").eval()
    prompt_ids = tokenizer.encode(prompt)
    expected = peft_logprobs(model, "cli-zebra", prompt_ids, new_ids)
    diff = (got - expected).abs()
    assert diff.max() < LOGPROB_MAX_ATOL and diff.mean() < LOGPROB_MEAN_ATOL, (got, expected)
    # Not vacuous: the adapter moves these logprobs well beyond the tolerance.
    assert (got - peft_logprobs(model, None, prompt_ids, new_ids)).abs().max() > 3 * LOGPROB_MAX_ATOL


def _dequantized_base():
    """The served NF4 base as the server keeps it on the CPU: dequantized, exactly the NF4 values."""
    model = load_nf4_model(resolve_model(None), torch.device("cpu"))
    prepare_cpu_weights(model, "dequantized")
    return model
