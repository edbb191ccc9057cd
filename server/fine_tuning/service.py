"""Fine-tuning for one server: the records, the files and the job runner under its data directory.

Layout:

    <data dir>/fine_tuning.sqlite3   files, jobs, events, checkpoints (beside the adapter store)
    <data dir>/files/<file id>       uploaded training files (and jobs' result files)
    <data dir>/jobs/<job id>/        a job's work folder: train.log, events.jsonl, training_report.json

The adapter store (`<data dir>/adapters/`) is the server's own; jobs publish into it through
the `publish` function they are given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plait.server.fine_tuning.files import FileStore
from plait.server.fine_tuning.jobs import JobRunner, TrainerSetup
from plait.server.fine_tuning.records import DATABASE_FILE, Records


@dataclass
class FineTuning:
    records: Records
    files: FileStore
    jobs: JobRunner

    @classmethod
    def open(
        cls,
        data_dir: Path,
        setup: TrainerSetup,
        publish: Callable[[str, Path], object],
        check_name: Callable[[str], object],
        max_file_bytes: int,
        training: Callable[[bool], object] = lambda running: None,
        copy_adapter: Callable[[str, Path], bool] = lambda name, folder: False,
    ) -> FineTuning:
        """Open (or create) the records under `data_dir`; `start()` settles old jobs and runs queued ones.

        `publish(name, adapter_folder)` serves a finished job's adapter; `check_name(name)` raises
        ClientError when no adapter could be published under `name`; `training(running)` hears when
        a trainer starts and stops; `copy_adapter(name, folder)` copies a served adapter for a job
        that starts from it."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        records = Records.open(f"sqlite:///{(data_dir / DATABASE_FILE).absolute()}")
        files = FileStore(data_dir / "files", records, max_file_bytes)
        jobs = JobRunner(
            records, files, data_dir / "jobs", setup, publish, check_name, training, copy_adapter=copy_adapter
        )
        return cls(records, files, jobs)

    def start(self) -> None:
        self.jobs.start()

    def stop(self) -> None:
        self.jobs.stop()
