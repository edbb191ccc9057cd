"""The job runner on its own (no server): what a server killed outright leaves behind, and the
trainer's command line a job gets."""

from __future__ import annotations

import signal
import subprocess
import time

from plait.server.fine_tuning.contract import ADAPTER_DIR, EVENTS_FILE
from plait.server.fine_tuning.files import FileStore
from plait.server.fine_tuning.hyperparameters import Hyperparameters
from plait.server.fine_tuning.jobs import RESTARTED, JobRunner, TrainerSetup
from plait.server.fine_tuning.records import DATABASE_FILE, FileRecord, JobRecord, Records

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


def _runner(tmp_path) -> JobRunner:
    records = Records.open(f"sqlite:///{tmp_path / DATABASE_FILE}")
    files = FileStore(tmp_path / "files", records)
    return JobRunner(records, files, tmp_path / "jobs", TrainerSetup(BASE, tmp_path), publish=lambda *a: None)


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
        for job_id in orphans:
            job = runner.get(job_id)
            assert job.status == "failed" and job.error["message"] == RESTARTED and job.pid is None
    finally:
        runner.stop()
        orphans["ftjob-reused"].kill()
        orphans["ftjob-reused"].wait()


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
    records = Records.open(f"sqlite:///{tmp_path / DATABASE_FILE}")
    files = FileStore(tmp_path / "files", records)
    heard = []
    runner = JobRunner(
        records,
        files,
        tmp_path / "jobs",
        TrainerSetup(BASE, tmp_path, python=str(fake)),
        publish=lambda *a: None,
        training=heard.append,
        poll_seconds=0.05,
    )
    (tmp_path / "files" / "file-x").write_text('{"prompt": "q", "completion": "a"}\n')
    records.insert(FileRecord("file-x", "d.jsonl", "fine-tune", 35, 0, 1))
    job = runner.create(model=BASE, training_file="file-x")
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while runner.get(job.id).status != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        runner.stop()
    assert heard == [True, False]
    assert runner.get(job.id).error["message"] == "no GPU here"
