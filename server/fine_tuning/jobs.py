"""Fine-tuning jobs: checked when created, queued in SQLite, run one at a time as `plait train` child processes.

The server never imports the trainer. A job's trainer runs as `python -m plait.cli train` in
its own process group, with its work folder `<data dir>/jobs/<job id>/` as the current
directory (a repository-root `kernels/` on `sys.path` would shadow a package bitsandbytes
needs), on exactly the model folder the server loaded (`--model`). A runner thread takes the
oldest queued job, starts the child, follows the JSON lines it writes to `events.jsonl`
(`--events`) into the job's events and checkpoints, and when the child exits 0 publishes the
adapter through `publish` (the same path as an upload) as `ft:<base>:<suffix>:<job id>`.

- A failing trainer fails the job with the trainer's own error line (`plait train: error: ...`).
- Cancelling a running job kills the child's process group; nothing is published.
- Stopping the server kills the child too and leaves the job `running`; when a server opens the
  records again, such a job is marked failed ("the server restarted while the job was running")
  and queued jobs run in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from plait.server.adapters.store import InvalidAdapterId, validate_adapter_id
from plait.server.fine_tuning.errors import FineTuningError
from plait.server.fine_tuning.files import PURPOSE, RESULTS_PURPOSE, FileStore
from plait.server.fine_tuning.records import Records, new_id

log = logging.getLogger("plait.fine_tuning")

BASE_LEARNING_RATE = 2e-4  # times learning_rate_multiplier; the usual QLoRA rate (and plait train's default)
MAX_MICRO_BATCH = 8  # a larger batch_size is reached by gradient accumulation
MAX_SUFFIX_CHARS = 64
KILL_GRACE_SECONDS = 10.0  # SIGTERM first, SIGKILL after this
ADAPTER_DIR = "adapter"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
REPORT_FILE = "training_report.json"
RESTARTED = "the server restarted while the job was running"
FINISHED = ("succeeded", "failed", "cancelled")
_SUFFIX = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_ERROR_PREFIX = "plait train: error: "

# The hyperparameters a job takes: OpenAI's three, and Plait's LoRA extension.
#   name: (default for "auto", check, what the check wants)
HYPERPARAMETERS: dict[str, tuple[float, Callable[[object, int], bool], str]] = {
    "n_epochs": (3, lambda v, _: _is_int(v) and 1 <= v <= 100, "an integer from 1 to 100"),
    "batch_size": (4, lambda v, _: _is_int(v) and 1 <= v <= 256, "an integer from 1 to 256"),
    "learning_rate_multiplier": (1.0, lambda v, _: _is_number(v) and 0 < v <= 100, "a number above 0, at most 100"),
    "lora_rank": (16, lambda v, max_rank: _is_int(v) and 1 <= v <= max_rank, "an integer from 1 to {max_rank}"),
    "lora_alpha": (32.0, lambda v, _: _is_number(v) and 0 < v <= 1e6, "a number above 0"),
    "lora_dropout": (0.05, lambda v, _: _is_number(v) and 0 <= v < 1, "a number from 0 up to (not including) 1"),
}


@dataclass(frozen=True)
class TrainerSetup:
    """What every job's trainer gets from the server."""

    base_model: str  # the served name: jobs must name it as `model`
    model_path: Path  # the folder the server loaded, given to the trainer as --model
    device: str | None = None  # --device; None: the trainer's default
    dtype: str = "auto"  # --dtype: auto, bfloat16 or float32
    threads: int | None = None  # --threads
    max_lora_rank: int = 64  # the server refuses adapters above it, so jobs may not ask for more
    python: str = sys.executable


def resolve_hyperparameters(given: dict | None, max_rank: int) -> dict:
    """Every hyperparameter with "auto" (or absent) replaced by its default; FineTuningError names a bad one."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(HYPERPARAMETERS))
    if unknown:
        raise FineTuningError(
            400,
            f"Unknown hyperparameter '{unknown[0]}'; known: {', '.join(HYPERPARAMETERS)}.",
            f"hyperparameters.{unknown[0]}",
            "invalid_value",
        )
    resolved = {}
    for name, (default, ok, wanted) in HYPERPARAMETERS.items():
        value = given.get(name, "auto")
        if value is None or value == "auto":
            value = default
        elif not ok(value, max_rank):
            raise FineTuningError(
                400,
                f"hyperparameters.{name} must be 'auto' or {wanted.format(max_rank=max_rank)}, "
                f"got {json.dumps(value)}.",
                f"hyperparameters.{name}",
                "invalid_value",
            )
        resolved[name] = float(value) if isinstance(default, float) else value
    return resolved


def micro_batches(batch_size: int) -> tuple[int, int]:
    """(examples per micro-batch, micro-batches per step) making one step of `batch_size` examples."""
    micro = max(d for d in range(1, min(batch_size, MAX_MICRO_BATCH) + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def fine_tuned_name(base_model: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming, without the organisation: `ft:<base>:<suffix>:<job id>` (the suffix may be empty)."""
    return f"ft:{base_model}:{suffix or ''}:{job_id}"


@dataclass
class _Running:
    job_id: str
    process: subprocess.Popen
    kill_sent: float | None = None  # monotonic time SIGTERM went to the group

    def terminate(self) -> None:
        if self.kill_sent is None:
            self.kill_sent = time.monotonic()
            _signal_group(self.process, signal.SIGTERM)


@dataclass
class _Progress:
    """What the runner learned from a job's event lines so far."""

    total_steps: int | None = None
    eval_loss: dict[int, float] = field(default_factory=dict)


class JobRunner:
    def __init__(
        self,
        records: Records,
        files: FileStore,
        jobs_dir: Path,
        setup: TrainerSetup,
        publish: Callable[[str, dict[str, bytes]], object],
        poll_seconds: float = 0.5,
    ):
        self.records = records
        self.files = files
        self.jobs_dir = Path(jobs_dir).resolve()
        self.setup = setup
        self.publish = publish
        self.poll_seconds = poll_seconds
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # status changes, and the child being started or killed
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._running: _Running | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Settle what the last server left (running jobs fail), then run queued jobs on a thread."""
        if self._thread is not None:
            return
        for job in self.records.all("jobs", status="running"):
            _kill_leftover(job, self.jobs_dir / job["id"])
            _clean_job_dir(self.jobs_dir / job["id"])
            self._finish(job["id"], "failed", error={"code": "server_restarted", "message": RESTARTED, "param": None})
        self._thread = threading.Thread(target=self._loop, name="plait-fine-tuning", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = KILL_GRACE_SECONDS + 5) -> None:
        """Kill a running trainer (its job stays `running` until the next start) and end the thread."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self._running is not None:
                self._running.terminate()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the API's side -----------------------------------------------------------------------------

    def create(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None = None,
        hyperparameters: dict | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        metadata: dict | None = None,
    ) -> dict:
        """Check a job against this server and queue it; FineTuningError (4xx) says what is wrong."""
        if model != self.setup.base_model:
            raise FineTuningError(
                400,
                f"Model '{model}' cannot be fine-tuned here: this server trains adapters for "
                f"its base model '{self.setup.base_model}' only.",
                "model",
                "model_not_available",
            )
        if suffix is not None and (len(suffix) > MAX_SUFFIX_CHARS or not _SUFFIX.fullmatch(suffix) or ".." in suffix):
            raise FineTuningError(
                400,
                f"suffix must be up to {MAX_SUFFIX_CHARS} letters, digits, '_', '-' and '.' "
                f"(not starting with '.', no '..'), got {json.dumps(suffix)}.",
                "suffix",
                "invalid_value",
            )
        if seed is None:
            seed = secrets.randbelow(1 << 31)
        elif not _is_int(seed) or not 0 <= seed < 1 << 31:
            raise FineTuningError(
                400, f"seed must be an integer from 0 to 2147483647, got {json.dumps(seed)}.", "seed", "invalid_value"
            )
        train = self._training_file(training_file, "training_file")
        if validation_file is not None:
            self._training_file(validation_file, "validation_file")
        resolved = resolve_hyperparameters(hyperparameters, self.setup.max_lora_rank)
        job_id = new_id("ftjob")
        try:
            validate_adapter_id(fine_tuned_name(self.setup.base_model, suffix, job_id))
        except InvalidAdapterId as exc:
            raise FineTuningError(
                400, f"The fine-tuned model's name would be invalid: {exc}.", "suffix", "invalid_value"
            ) from None

        # The job keeps its own links to the data: deleting the files later does not touch it.
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir()
        try:
            for file_id in dict.fromkeys(filter(None, (training_file, validation_file))):  # the same one may be both
                _link(self.files.path(file_id), job_dir / file_id)
            self.records.insert(
                "jobs",
                {
                    "id": job_id,
                    "created_at": int(time.time()),
                    "status": "queued",
                    "model": model,
                    "training_file": training_file,
                    "validation_file": validation_file,
                    "hyperparameters": resolved,
                    "suffix": suffix,
                    "seed": seed,
                    "metadata": metadata,
                    "train_examples": train["examples"],
                },
            )
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self.records.add_event(job_id, f"Created fine-tuning job: {job_id}")
        self.records.add_event(job_id, f"Validated training file: {training_file} ({train['examples']} examples)")
        self.records.add_event(job_id, "Files validated, moving job to queued state")
        self._wake.set()
        return self.get(job_id)

    def get(self, job_id: str) -> dict:
        job = self.records.get("jobs", job_id)
        if job is None:
            raise FineTuningError(404, f"No fine-tuning job '{job_id}'.", "fine_tuning_job_id", "job_not_found")
        return job

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job (a running trainer's process group is killed); nothing is published."""
        with self._lock:
            job = self.get(job_id)
            if job["status"] in ("succeeded", "failed"):
                raise FineTuningError(
                    400,
                    f"Job {job_id} has already {job['status']}; only queued or running jobs can be cancelled.",
                    "fine_tuning_job_id",
                    "job_not_cancellable",
                )
            if job["status"] != "cancelled":
                self._finish(job_id, "cancelled")
                if self._running is not None and self._running.job_id == job_id:
                    self._running.terminate()  # the runner thread sees the exit and cleans up
                else:
                    _clean_job_dir(self.jobs_dir / job_id)
        return self.get(job_id)

    # --- the runner thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            job = self._claim_next()
            if job is None:
                self._wake.wait(5.0)
                continue
            try:
                self._run(job)
            except Exception as exc:  # our own fault: the job fails with it and the queue goes on
                log.exception("fine-tuning job %s", job["id"])
                with self._lock:
                    if self.get(job["id"])["status"] == "running" and not self._stopping.is_set():
                        self._fail(job["id"], f"internal error running the job: {exc}")

    def _claim_next(self) -> dict | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            queued, _ = self.records.page("jobs", where={"status": "queued"}, limit=1, newest_first=False)
            if not queued:
                return None
            job = queued[0]
            self.records.update("jobs", job["id"], status="running", started_at=int(time.time()))
            self.records.add_event(job["id"], "Fine-tuning job started")
            return self.get(job["id"])

    def _run(self, job: dict) -> None:
        job_id, job_dir = job["id"], self.jobs_dir / job["id"]
        env = {k: v for k, v in os.environ.items() if k not in ("PLAIT_API_KEY", "PLAIT_ADMIN_KEY")}
        env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")  # progress comes through the events file
        with self._lock, open(job_dir / LOG_FILE, "ab") as log_file:
            if self._stopping.is_set():  # between the claim and here: the job waits for the next start
                self.records.update("jobs", job_id, status="queued", started_at=None)
                return
            if self.get(job_id)["status"] != "running":
                return  # cancelled meanwhile
            process = subprocess.Popen(
                self._command(job),
                cwd=job_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._running = _Running(job_id, process)
            self.records.update("jobs", job_id, pid=process.pid)
        log.info("fine-tuning job %s: trainer started (pid %d)", job_id, process.pid)

        events, progress = _EventFile(job_dir / EVENTS_FILE), _Progress()
        while True:
            try:
                returncode = process.wait(timeout=self.poll_seconds)
                break
            except subprocess.TimeoutExpired:
                pass
            running = self._running
            if running.kill_sent is None:
                self._record(job, events.read(), progress)
            elif time.monotonic() - running.kill_sent > KILL_GRACE_SECONDS:
                _signal_group(process, signal.SIGKILL)
        _signal_group(process, signal.SIGKILL)  # whatever the trainer started dies with it

        with self._lock:
            self._running = None
            status = self.get(job_id)["status"]
            if status != "cancelled" and not self._stopping.is_set():
                self._record(job, events.read(), progress)  # what the trainer wrote last
            if status == "cancelled":
                log.info("fine-tuning job %s: cancelled", job_id)
            elif self._stopping.is_set():
                self.records.add_event(job_id, "The server is shutting down: training stopped", level="warn")
                return  # stays `running`; the next start marks it failed
            elif returncode == 0:
                self._succeed(job, job_dir)
            else:
                self._fail(job_id, trainer_error(job_dir / LOG_FILE, returncode, job_dir))
        _clean_job_dir(job_dir)

    def _command(self, job: dict) -> list[str]:
        h, s = job["hyperparameters"], self.setup
        micro, accum = micro_batches(h["batch_size"])
        steps_per_epoch = math.ceil(math.ceil(job["train_examples"] / micro) / accum)
        cmd = [
            s.python,
            "-m",
            "plait.cli",
            "train",
            job["training_file"],
            "--output",
            ADAPTER_DIR,
            "--model",
            str(s.model_path),
            "--epochs",
            str(h["n_epochs"]),
            "--batch-size",
            str(micro),
            "--grad-accum",
            str(accum),
            "--lr",
            repr(BASE_LEARNING_RATE * h["learning_rate_multiplier"]),
            "--lora-r",
            str(h["lora_rank"]),
            "--lora-alpha",
            repr(h["lora_alpha"]),
            "--lora-dropout",
            repr(h["lora_dropout"]),
            "--seed",
            str(job["seed"]),
            "--save-every",
            str(steps_per_epoch),
            "--events",
            EVENTS_FILE,
            "--dtype",
            s.dtype,
        ]
        if job["validation_file"]:
            cmd += ["--eval-file", job["validation_file"]]
        if s.device:
            cmd += ["--device", s.device]
        if s.threads:
            cmd += ["--threads", str(s.threads)]
        return cmd

    def _record(self, job: dict, lines: list[dict], progress: _Progress) -> None:
        """The trainer's event lines as job events and checkpoints."""
        job_id = job["id"]
        for e in lines:
            kind = e.get("type")
            if kind == "start":
                progress.total_steps = e["total_steps"]
                resumed = f", resuming at step {e['resumed_from_step']}" if e.get("resumed_from_step") else ""
                message = f"Training {e['total_steps']} steps on {e['examples']} examples{resumed}"
                self.records.add_event(job_id, message)
            elif kind == "step":
                data = {k: e[k] for k in ("step", "total_steps", "train_loss", "learning_rate", "tokens", "epochs")}
                message = f"Step {e['step']}/{e['total_steps']}: training loss={e['train_loss']:.4f}"
                self.records.add_event(job_id, message, data=data)
            elif kind == "eval":
                progress.eval_loss[e["step"]] = e["eval_loss"]
                self.records.add_event(
                    job_id,
                    f"Step {e['step']}: validation loss={e['eval_loss']:.4f}",
                    data={"step": e["step"], "valid_loss": e["eval_loss"]},
                )
            elif kind == "checkpoint":
                name = fine_tuned_name(self.setup.base_model, job["suffix"], job_id) + f":ckpt-step-{e['step']}"
                self._checkpoint(job_id, e["step"], name, e.get("train_loss"), progress.eval_loss.get(e["step"]))
                self.records.add_event(job_id, f"Checkpoint created at step {e['step']}")

    def _checkpoint(self, job_id: str, step: int, name: str, train_loss, valid_loss) -> None:
        metrics = {"step": float(step), "train_loss": train_loss, "valid_loss": valid_loss}
        self.records.insert(
            "checkpoints",
            {
                "id": new_id("ftckpt"),
                "job_id": job_id,
                "created_at": int(time.time()),
                "step_number": step,
                "fine_tuned_model_checkpoint": name,
                "metrics": {k: v for k, v in metrics.items() if v is not None},
            },
        )

    def _succeed(self, job: dict, job_dir: Path) -> None:
        job_id, adapter = job["id"], job_dir / ADAPTER_DIR
        name = fine_tuned_name(self.setup.base_model, job["suffix"], job_id)
        try:
            report = json.loads((adapter / REPORT_FILE).read_text())
            shutil.copyfile(adapter / REPORT_FILE, job_dir / REPORT_FILE)
            files = {n: (adapter / n).read_bytes() for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        except (OSError, ValueError) as exc:
            return self._fail(job_id, f"the trainer finished but its adapter cannot be read: {exc}")
        try:
            self.publish(name, files)
        except Exception as exc:  # the store's own refusal, said in its words
            return self._fail(
                job_id, f"publishing the adapter failed: {getattr(exc, 'message', None) or exc}", code="publish_failed"
            )
        results = self.files.add_bytes(_results_csv(report), f"{job_id}-step_metrics.csv", RESULTS_PURPOSE)
        self._checkpoint(job_id, report["steps"], name, report.get("final_train_loss"), report.get("final_eval_loss"))
        self.records.add_event(job_id, f"New fine-tuned model created: {name}")
        self._finish(
            job_id,
            "succeeded",
            fine_tuned_model=name,
            trained_tokens=report.get("tokens"),
            result_files=[results["id"]],
        )
        log.info("fine-tuning job %s: published %s", job_id, name)

    def _fail(self, job_id: str, message: str, code: str = "training_failed") -> None:
        log.warning("fine-tuning job %s failed: %s", job_id, message)
        self._finish(job_id, "failed", error={"code": code, "message": message, "param": None})

    def _finish(self, job_id: str, status: str, **fields) -> None:
        self.records.update("jobs", job_id, status=status, finished_at=int(time.time()), pid=None, **fields)
        message = {
            "succeeded": "The job has successfully completed",
            "cancelled": "Fine-tuning job cancelled",
            "failed": f"Fine-tuning job failed: {(fields.get('error') or {}).get('message')}",
        }[status]
        self.records.add_event(job_id, message, level="error" if status == "failed" else "info")

    def _training_file(self, file_id: str, param: str) -> dict:
        row = self.records.get("files", file_id) if isinstance(file_id, str) else None
        if row is None:
            raise FineTuningError(400, f"Invalid {param}: no file '{file_id}'.", param, "invalid_file")
        if row["purpose"] != PURPOSE:
            raise FineTuningError(
                400,
                f"Invalid {param}: '{file_id}' has purpose '{row['purpose']}', not '{PURPOSE}'.",
                param,
                "invalid_file",
            )
        return row


def trainer_error(log_path: Path, returncode: int, job_dir: Path) -> str:
    """Why the trainer failed, in its own words: its `plait train: error:` line and the detail lines below it."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (64 << 10)))
            lines = f.read().decode("utf-8", "replace").replace(f"{job_dir}{os.sep}", "").splitlines()
    except OSError:
        lines = []
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(_ERROR_PREFIX):
            details = []
            for line in lines[index + 1 :]:
                if not line.startswith("  "):
                    break
                details.append(line.strip())
            message = lines[index].removeprefix(_ERROR_PREFIX)
            return message + (f" ({'; '.join(details)})" if details else "")
    if returncode < 0:
        return f"the trainer was killed by {signal.Signals(-returncode).name}"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return f"the trainer exited with status {returncode}" + (f": {last}" if last else "")


class _EventFile:
    """Follows a JSONL file another process appends to, taking only whole lines."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        found = []
        for line in data[:end].splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                log.warning("%s: unreadable event line skipped", self.path)
        return found


def _results_csv(report: dict) -> bytes:
    """OpenAI's result file: one row per step; validation loss where it was measured."""
    valid = {int(step): loss for step, loss in report.get("eval_loss", [])}
    rows = ["step,train_loss,valid_loss"]
    for step, loss in report.get("train_loss", []):
        step = int(step)
        rows.append(f"{step},{loss:.6f}," + (f"{valid[step]:.6f}" if step in valid else ""))
    return ("\n".join(rows) + "\n").encode()


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _clean_job_dir(job_dir: Path) -> None:
    """Keep the log, the events and the report; drop data links, the adapter and any checkpoints."""
    if not job_dir.is_dir():
        return
    for entry in job_dir.iterdir():
        if entry.name in (LOG_FILE, EVENTS_FILE, REPORT_FILE):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the child leads its own group (start_new_session)


def _kill_leftover(job: dict, job_dir: Path) -> None:
    """A trainer that outlived its server (killed with SIGKILL) is stopped before its job is marked failed."""
    pid = job.get("pid")
    if not pid:
        return
    try:
        if Path(os.readlink(f"/proc/{pid}/cwd")) != job_dir.resolve():
            return  # the pid is someone else's by now
        os.killpg(pid, signal.SIGKILL)
        log.warning("fine-tuning job %s: killed its leftover trainer (pid %d)", job["id"], pid)
    except OSError:
        pass


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
