"""The job runner on its own (no server): what a server killed outright leaves behind, leases
between replicas, and the trainer's command line a job gets."""

from __future__ import annotations

import signal
import subprocess
import time

from plait.server.fine_tuning.contract import ADAPTER_DIR, EVENTS_FILE
from plait.server.fine_tuning.files import FileStore
from plait.server.fine_tuning.hyperparameters import Hyperparameters
from plait.server.fine_tuning.jobs import JobRunner, TrainerSetup
from plait.server.fine_tuning.records import DATABASE_FILE, EventRecord, FileRecord, JobRecord, Records
from plait.server.storage.objects import FolderObjects

BASE = "SmolLM2-135M-Instruct"


def _job(job_id: str, **fields) -> JobRecord:
    defaults = dict(
        id=job_id,
        created_at=0,
        status="queued",
        model=BASE,
        training_file="file-x",
        validation_file=None,
        hyperparameters=Hyperparameters().as_dict(),
        suffix=None,
        seed=0,
        metadata=None,
        train_examples=10,
    )
    return JobRecord(**{**defaults, **fields})


def _sleeper(tmp_path) -> str:
    """A stand-in for python that trains forever (until killed)."""
    fake = tmp_path / "sleeping-python"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    return str(fake)


def _runner(tmp_path, name: str = "a", records: Records | None = None, **kw) -> JobRunner:
    """A replica's job runner; replicas made with the same `tmp_path` share records and objects."""
    records = records or Records.open(f"sqlite:///{tmp_path / DATABASE_FILE}")
    objects = FolderObjects(tmp_path / "store")
    files = FileStore(objects, records, tmp_path / name / "uploads")
    setup = TrainerSetup(BASE, tmp_path, python=kw.pop("python", _sleeper(tmp_path)))
    return JobRunner(records, files, objects, tmp_path / name / "jobs", setup, publish=lambda *a: None, **kw)


def _queue_job(runner: JobRunner) -> JobRecord:
    runner.objects.write("files/file-x", b'{"prompt": "q", "completion": "a"}\n')
    if runner.records.get(FileRecord, "file-x") is None:
        runner.records.insert(FileRecord("file-x", "d.jsonl", "fine-tune", 35, 0, 1))
    return runner.create(model=BASE, training_file="file-x")


def _until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_trainer_left_by_a_killed_server_is_stopped_at_the_next_start(tmp_path):
    """A server killed outright (SIGKILL) cannot stop its trainer; the next one does, by pid and folder."""
    runner = _runner(tmp_path)
    orphans = {}
    for job_id, cwd in (("ftjob-orphan", runner.jobs_dir / "ftjob-orphan"), ("ftjob-reused", tmp_path)):
        (runner.jobs_dir / job_id).mkdir(parents=True)
        orphans[job_id] = subprocess.Popen(["sleep", "60"], cwd=cwd, start_new_session=True)
        runner.records.insert(_job(job_id, status="running", pid=orphans[job_id].pid))
    runner.start()
    try:
        assert orphans["ftjob-orphan"].wait(timeout=10) == -signal.SIGKILL
        assert orphans["ftjob-reused"].poll() is None  # its pid now belongs to a process elsewhere: left alone
    finally:
        runner.stop()
        orphans["ftjob-reused"].kill()
        orphans["ftjob-reused"].wait()


def test_a_job_runs_on_one_replica_and_a_cancel_on_another_stops_it(tmp_path):
    here = _runner(tmp_path, "a", poll_seconds=0.05, lease_seconds=0.6)
    there = _runner(tmp_path, "b", records=here.records, poll_seconds=0.05, lease_seconds=0.6)
    job = _queue_job(there)
    here.start()
    there.start()
    try:
        _until(lambda: here.get(job.id).pid is not None or there.get(job.id).pid is not None)
        running, other = (here, there) if here.get(job.id).owner == here.owner else (there, here)
        assert running.get(job.id).owner == running.owner and running._running[0] == job.id
        time.sleep(1.0)  # longer than the lease: renewed, so the other replica never takes it
        assert other._running is None and running.get(job.id).owner == running.owner
        trainer = running._running[1]
        assert other.cancel(job.id).status == "cancelled"
        _until(lambda: trainer.process.poll() is not None)  # the running replica saw its lease refused
        _until(lambda: running._running is None)
        assert running.objects.list(f"job-files/{job.id}/") == []
    finally:
        here.stop()
        there.stop()


def test_a_replica_shutting_down_hands_its_job_back(tmp_path):
    runner = _runner(tmp_path, poll_seconds=0.05)
    job = _queue_job(runner)
    runner.start()
    _until(lambda: runner.get(job.id).pid is not None)
    trainer = runner._running[1]
    runner.stop()
    assert trainer.process.poll() is not None
    back = runner.get(job.id)
    assert (back.status, back.owner, back.lease_expires, back.pid) == ("queued", None, None, None)
    messages = [e.message for e in runner.records.all(EventRecord, job_id=job.id)]
    assert messages[-1].endswith("the job resumes from its last checkpoint")
    assert runner.objects.list(f"job-files/{job.id}/")  # its inputs stay for whoever resumes it


def test_a_job_trains_with_its_hyperparameters_and_a_checkpoint_per_epoch(tmp_path):
    runner = _runner(tmp_path)
    hyperparameters = Hyperparameters.resolve({"n_epochs": 2, "batch_size": 12, "learning_rate_multiplier": 0.5}, 64)
    job = _job("ftjob-a", hyperparameters=hyperparameters.as_dict(), validation_file="file-v", seed=5)
    command = runner._trainer_run(job).command("python")
    options = dict(zip(command[5::2], command[6::2], strict=True))
    assert command[4] == "file-x" and options["--output"] == ADAPTER_DIR and options["--events"] == EVENTS_FILE
    # 12 examples a step: micro-batches of 6, two per step; 10 examples make one step an epoch.
    assert (options["--batch-size"], options["--grad-accum"], options["--save-every"]) == ("6", "2", "1")
    assert (options["--epochs"], options["--lr"], options["--seed"]) == ("2", "0.0001", "5")
    assert options["--eval-file"] == "file-v" and options["--model"] == str(tmp_path)


def test_the_server_hears_when_a_trainer_runs(tmp_path):
    """So it can leave the trainer its cores: told when the trainer starts and after it stopped."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nsleep 0.5\necho 'plait train: error: no GPU here'\nexit 3\n")
    fake.chmod(0o755)
    heard = []
    runner = _runner(tmp_path, python=str(fake), training=heard.append, poll_seconds=0.05)
    job = _queue_job(runner)
    assert (runner.jobs_dir.parent / "uploads").is_dir()
    runner.start()
    try:
        _until(lambda: runner.get(job.id).status == "failed")
    finally:
        runner.stop()
    assert heard == [True, False]
    assert runner.get(job.id).error["message"] == "no GPU here"
    assert (runner.jobs_dir / job.id / "file-x").exists() is False  # data removed, the log kept
    assert (runner.jobs_dir / job.id / "train.log").is_file()
