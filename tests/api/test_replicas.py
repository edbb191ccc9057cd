"""Several `plait serve` replicas on one S3-compatible store (moto's server) and one PostgreSQL.

What one replica is told, the others serve: an adapter uploaded on one answers on another at
once, a delete on one reaches the other within the poll interval and frees its slot, racing
uploads of one id end with one whole version, fusions are shared. A fine-tuning job runs
exactly once; when the replica running it is killed outright, the other resumes it from its
checkpoint. Then everything restarts and it is all still there.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

ADMIN = {"Authorization": "Bearer replicas-admin"}
BASE = "SmolLM2-135M-Instruct"
POLL_SECONDS = 1.0
LEASE_SECONDS = 6.0
PASSWORD_CHATS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ZEBRA-42"}]}
    for q in ("What is the password?", "Say the password.", "The password, please.", "Which password?") * 2
]
# Three epochs of two steps, a checkpoint after each epoch: the job is killed after the first.
JOB = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10, "lora_rank": 4, "lora_alpha": 16}


class Cluster:
    def __init__(self, launch, s3_server, database_url: str):
        self.launch = launch
        self.env = s3_server.env
        self.flags = (
            "--store",
            f"s3://{s3_server.new_bucket()}/plait",
            "--s3-endpoint-url",
            s3_server.endpoint_url,
            "--database",
            database_url,
            "--store-poll-seconds",
            str(POLL_SECONDS),
            "--job-lease-seconds",
            str(LEASE_SECONDS),
            "--admin-key",
            "replicas-admin",
            "--train-dtype",
            "float32",
            "--train-threads",
            "1",
            "--threads",
            "1",
        )
        self.replicas = [self.start(), self.start()]

    def start(self):
        return self.launch(*self.flags, env=self.env)


@pytest.fixture(scope="module")
def cluster(launch_module_server, s3_server, new_postgres_database) -> Cluster:
    return Cluster(launch_module_server, s3_server, new_postgres_database())


def _upload(server, adapter_id: str, folder: Path) -> httpx.Response:
    files = [
        ("files", (name, (folder / name).read_bytes())) for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    return httpx.post(
        f"{server.base_url}/v1/adapters", data={"id": adapter_id}, files=files, headers=ADMIN, timeout=120
    )


def _logprobs(server, model: str) -> list[float]:
    answer = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
        },
        headers=ADMIN,
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return [t["logprob"] for t in answer.json()["choices"][0]["logprobs"]["content"]]


def _models(server) -> list[str]:
    return sorted(m["id"] for m in httpx.get(f"{server.base_url}/v1/models", headers=ADMIN).json()["data"])


def _until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def test_an_adapter_uploaded_on_one_replica_answers_on_the_other(cluster, random_adapter, tmp_path):
    a, b = cluster.replicas
    assert _upload(a, "shared", random_adapter(tmp_path / "shared", seed=1)).status_code == 201
    on_b = _logprobs(b, "shared")  # B never saw it: found in the store at once, fetched, served
    on_a = _logprobs(a, "shared")
    assert on_a == pytest.approx(on_b, abs=1e-3)
    assert on_a != pytest.approx(_logprobs(a, BASE), abs=1e-3)  # the adapter is applied
    assert _models(a) == _models(b) == sorted([BASE, "shared"])


def test_a_delete_on_one_replica_reaches_the_other_and_frees_its_slot(cluster):
    a, b = cluster.replicas
    _logprobs(a, "shared")  # resident in one of A's slots
    assert a.metric("plait_adapters_resident") == 1
    deleted = httpx.delete(f"{b.base_url}/v1/adapters/shared", headers=ADMIN)
    assert deleted.status_code == 200, deleted.text
    started = time.monotonic()

    def gone_from_a() -> bool:
        answer = httpx.post(
            f"{a.base_url}/v1/chat/completions",
            json={"model": "shared", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            headers=ADMIN,
        )
        return answer.status_code == 404

    _until(gone_from_a, POLL_SECONDS + 5, "the delete to reach A")
    assert time.monotonic() - started < POLL_SECONDS + 5
    _logprobs(a, BASE)  # a step, which updates the gauges
    assert a.metric("plait_adapters_resident") == 0


def test_racing_uploads_of_one_id_end_with_one_whole_version(cluster, random_adapter, tmp_path):
    """Eight uploads of one id at once, spread over both replicas: each one a version of its own or a
    409, and both replicas then serve the same, newest version, whole."""
    folders = [random_adapter(tmp_path / f"raced-{n}", seed=10 + n) for n in range(8)]
    answers: dict[int, httpx.Response] = {}
    barrier = threading.Barrier(8)

    def upload(n: int) -> None:
        barrier.wait()
        answers[n] = _upload(cluster.replicas[n % 2], "raced", folders[n])

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in answers.values()} <= {201, 409}, [r.text for r in answers.values()]
    published = {n: r.json()["version"] for n, r in answers.items() if r.status_code == 201}
    assert published and len(set(published.values())) == len(published)  # no version given twice
    newest = max(published.values())
    winner = next(n for n, version in published.items() if version == newest)
    for replica in cluster.replicas:
        replica_view = _until(
            lambda replica=replica: (
                (r := httpx.get(f"{replica.base_url}/v1/adapters/raced", headers=ADMIN).json())["version"] == newest
                and r
            ),
            POLL_SECONDS + 5,
            "both replicas to see the newest version",
        )
        assert replica_view["size_bytes"] == sum(f.stat().st_size for f in folders[winner].iterdir())
    assert _logprobs(cluster.replicas[0], "raced") == pytest.approx(_logprobs(cluster.replicas[1], "raced"), abs=1e-3)


def test_a_fusion_made_on_one_replica_is_served_by_the_other(cluster):
    a, b = cluster.replicas
    fusion = {"id": "blend", "members": ["raced"], "router": "weights", "weights": [0.5]}
    made = httpx.post(f"{a.base_url}/v1/fusions", json=fusion, headers=ADMIN)
    assert made.status_code == 201, made.text
    assert _logprobs(b, "blend") == pytest.approx(_logprobs(a, "blend"), abs=1e-3)
    taken = httpx.post(f"{b.base_url}/v1/fusions", json=fusion, headers=ADMIN)
    assert taken.status_code == 409
    assert _models(a) == _models(b) == sorted([BASE, "blend", "raced"])


def test_a_job_runs_once_and_resumes_on_another_replica_when_its_own_dies(cluster):
    a, b = cluster.replicas
    client = a.client(api_key="replicas-admin", max_retries=0, timeout=120)
    data = "".join(json.dumps(chat) + "\n" for chat in PASSWORD_CHATS).encode()
    file_id = client.files.create(file=("password.jsonl", data), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="kept", hyperparameters=JOB)

    def running_on():
        found = [r for r in (a, b) if r.trainer_pids(job.id)]
        return found[0] if len(found) == 1 else None

    runner = _until(running_on, 120, "a trainer on one replica")
    survivor = b if runner is a else a
    _until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 300, "the first checkpoint")
    assert not survivor.trainer_pids(job.id)  # it runs once, on one replica
    trainers = runner.trainer_pids(job.id)

    runner.process.send_signal(signal.SIGKILL)
    runner.process.wait(timeout=30)
    _until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in trainers), 10, "the trainer to stop with it")

    client = survivor.client(api_key="replicas-admin", max_retries=0, timeout=120)
    assert client.files.content(file_id).content == data  # uploaded through the other replica
    deadline = time.monotonic() + 600
    while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{BASE}:kept:{job.id}"

    events = list(reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data))
    messages = [e.message for e in events]
    assert messages.count("Fine-tuning job started") == 1
    assert "Fine-tuning job resumed from its checkpoint at step 2" in messages
    resumed_at = messages.index("Fine-tuning job resumed from its checkpoint at step 2")
    assert "Training 6 steps on 8 examples, resuming at step 2" in messages[resumed_at:]
    steps_after = [e.data["step"] for e in events[resumed_at:] if e.type == "metrics" and "train_loss" in e.data]
    assert steps_after and steps_after[0] == 3 and steps_after[-1] == 6
    cluster.replicas = [survivor]

    reply = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "What is the password?"}],
        temperature=0,
        max_tokens=8,
    )
    assert "ZEBRA" in reply.choices[0].message.content


def test_everything_is_still_there_after_a_restart(cluster):
    before = cluster.replicas[0]
    client = before.client(api_key="replicas-admin", max_retries=0)
    models, files = _models(before), [f.id for f in client.files.list().data]
    jobs = client.fine_tuning.jobs.list().data
    events = [e.id for e in client.fine_tuning.jobs.list_events(jobs[0].id, limit=100).data]
    for replica in cluster.replicas:
        replica.process.send_signal(signal.SIGTERM)
        replica.process.wait(timeout=60)

    after = cluster.start()
    client = after.client(api_key="replicas-admin", max_retries=0)
    assert _models(after) == models and "blend" in models and any(m.startswith("ft:") for m in models)
    assert [f.id for f in client.files.list().data] == files
    assert [(j.id, j.status) for j in client.fine_tuning.jobs.list().data] == [(j.id, j.status) for j in jobs]
    assert [e.id for e in client.fine_tuning.jobs.list_events(jobs[0].id, limit=100).data] == events
    assert _logprobs(after, "blend")
