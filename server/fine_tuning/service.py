"""Fine-tuning for one replica: the shared records and objects, and this replica's job runner.

    records (SQLite or PostgreSQL)   files, jobs, events, checkpoints
    objects  files/<file id>         uploaded training files (and jobs' result files)
             job-files/<job id>/     a job's inputs and newest checkpoint, while it is not finished
    <work dir>/<job id>/             where this replica runs a job: train.log, events.jsonl,
                                     training_report.json

The adapter store is the server's own; jobs publish into it through the `publish` function
they are given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plait.server.fine_tuning.files import FileStore
from plait.server.fine_tuning.jobs import DEFAULT_LEASE_SECONDS, JobRunner, TrainerSetup
from plait.server.fine_tuning.records import Records
from plait.server.storage.objects import ObjectStore


@dataclass
class FineTuning:
    records: Records
    files: FileStore
    jobs: JobRunner
    train: bool = True  # whether this replica runs jobs, or only takes them

    @classmethod
    def open(
        cls,
        records: Records,
        objects: ObjectStore,
        work_dir: Path,
        setup: TrainerSetup,
        publish: Callable[[str, Path], object],
        check_name: Callable[[str], object],
        max_file_bytes: int,
        training: Callable[[bool], object] = lambda running: None,
        copy_adapter: Callable[[str, Path], bool] = lambda name, folder: False,
        train: bool = True,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> FineTuning:
        """`start()` runs jobs when `train`, else this replica only creates, lists and cancels them.

        `publish(name, adapter_folder)` serves a finished job's adapter; `check_name(name)` raises
        ClientError when no adapter could be published under `name`; `training(running)` hears when
        a trainer starts and stops; `copy_adapter(name, folder)` copies a served adapter for a job
        that starts from it."""
        work_dir = Path(work_dir)
        files = FileStore(objects, records, work_dir / "uploads", max_file_bytes)
        jobs = JobRunner(
            records,
            files,
            objects,
            work_dir / "jobs",
            setup,
            publish,
            check_name,
            training,
            copy_adapter=copy_adapter,
            lease_seconds=lease_seconds,
        )
        return cls(records, files, jobs, train)

    def start(self) -> None:
        if self.train:
            self.jobs.start()

    def stop(self) -> None:
        self.jobs.stop()
