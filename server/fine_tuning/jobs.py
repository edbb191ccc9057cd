"""Fine-tuning jobs: checked when created, queued in the records, run by whichever replica claims them.

Every replica started with `--train` runs a supervisor (`JobRunner`'s thread) that claims the
oldest queued job (`Records.claim_job`: exactly one claimer wins), starts its trainer
(`TrainerProcess`) in a local work folder, follows the event lines the trainer writes
(`contract.EventReader`) into the job's events and checkpoints, and when the trainer exits 0
publishes the adapter through `publish` (the same path as an upload) as
`ft:<base>:<suffix>:<job id>`.

What a job needs lives in the object store under `job-files/<job id>/`, so any replica can run
it: its data files and the adapter it starts from, copied there when it is created, and its
newest checkpoint, uploaded whenever the trainer saves one.

- A running job holds a lease that its supervisor renews. A replica that dies stops renewing;
  once the lease lapses another `--train` replica claims the job, fetches its inputs and
  checkpoint, and resumes it (`plait train --resume`): the events go on where they stopped.
- A replica shutting down kills its trainer and hands the job back to the queue, to resume the
  same way on whichever replica claims it next (itself, once it is back).
- A failing trainer fails the job with the trainer's own error line.
- Cancelling a job, on any replica, marks it cancelled; the replica running it sees its lease
  refused, kills the trainer's process group, and publishes nothing.

The API's threads create, read and cancel jobs while the supervisor runs them: the lock
orders status changes and the starting and killing of the trainer.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from plait.server.errors import ClientError, NotFound
from plait.server.fine_tuning import contract
from plait.server.fine_tuning.files import PURPOSE, RESULTS_PURPOSE, FileStore, file_key
from plait.server.fine_tuning.hyperparameters import Hyperparameters
from plait.server.fine_tuning.records import CheckpointRecord, EventRecord, FileRecord, JobRecord, Records, new_id
from plait.server.fine_tuning.trainer_process import TrainerProcess, kill_leftover
from plait.server.storage.objects import ObjectStore

log = logging.getLogger("plait.fine_tuning")

MAX_SUFFIX_CHARS = 64
DEFAULT_LEASE_SECONDS = 30.0
_SUFFIX = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_KEPT_FILES = (contract.LOG_FILE, contract.EVENTS_FILE, contract.REPORT_FILE)  # in a job's folder, afterwards
INIT_ADAPTER = "init-adapter"  # in a job's folder: a copy of the fine-tuned model it starts from
_JOB_FILES = "job-files/"
_CHECKPOINT = "checkpoint.json"  # under job-files/<job id>/: which uploaded checkpoint is the newest
METHODS = {"supervised": ("sft", "chat"), "dpo": ("dpo", "preference")}  # API name: (trainer's, file format)


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


def fine_tuned_name(base_model: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming, without the organisation: `ft:<base>:<suffix>:<job id>` (the suffix may be empty)."""
    return f"ft:{base_model}:{suffix or ''}:{job_id}"


@dataclass
class _Progress:
    """What the supervisor learned from a job's event lines so far."""

    train_loss: dict[int, float] = field(default_factory=dict)
    eval_loss: dict[int, float] = field(default_factory=dict)
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # DPO's rewards
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    done: contract.DoneEvent | None = None


class JobRunner:
    def __init__(
        self,
        records: Records,
        files: FileStore,
        objects: ObjectStore,
        work_dir: Path,
        setup: TrainerSetup,
        publish: Callable[[str, Path], object],
        check_name: Callable[[str], object] = lambda name: None,
        training: Callable[[bool], object] = lambda running: None,
        poll_seconds: float = 0.5,
        copy_adapter: Callable[[str, Path], bool] = lambda name, folder: False,
        owner: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ):
        """`publish(name, adapter_folder)` serves a finished adapter; `check_name(name)` raises
        ClientError when a fine-tuned model could not be published under `name`; `training(True)`
        is called when a trainer starts and `training(False)` when it has stopped, so the server
        can leave it the cores it was given; `copy_adapter(name, folder)` copies the served
        adapter `name` into `folder` (False when there is none), for jobs that start from it.
        `work_dir` holds this replica's job folders; `owner` names this replica in job leases."""
        self.records = records
        self.files = files
        self.objects = objects
        self.jobs_dir = Path(work_dir).resolve()
        self.setup = setup
        self.publish = publish
        self.check_name = check_name
        self.training = training
        self.copy_adapter = copy_adapter
        self.poll_seconds = poll_seconds
        self.owner = owner or f"replica-{secrets.token_hex(6)}"
        self.lease_seconds = lease_seconds
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._running: tuple[str, TrainerProcess] | None = None  # (job id, its trainer)
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Stop trainers a killed server on this machine left running, then run jobs on a thread."""
        if self._thread is not None:
            return
        for job in self.records.all(JobRecord, status="running"):
            if kill_leftover(job.pid, self.jobs_dir / job.id):
                log.warning("fine-tuning job %s: killed its leftover trainer (pid %d)", job.id, job.pid)
        self._thread = threading.Thread(target=self._loop, name="plait-fine-tuning", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Kill a running trainer (its job goes back to the queue) and end the thread."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self._running is not None:
                self._running[1].terminate()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the API's side ---------------------------------------------------------------------------

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
        method: str = "supervised",
    ) -> JobRecord:
        """Check a job against this server and queue it; ClientError says what is wrong.

        `model` is the base model, or a fine-tuned model of it (`ft:<base>:...`), whose adapter the
        job then starts from (and, for DPO, measures against)."""
        from_adapter = model != self.setup.base_model
        if from_adapter and not model.startswith(f"ft:{self.setup.base_model}:"):
            raise ClientError(
                f"Model '{model}' cannot be fine-tuned here: this server trains adapters for its base "
                f"model '{self.setup.base_model}', starting from it or from one of its fine-tuned models (ft:...).",
                "model",
                "model_not_available",
            )
        if suffix is not None and (len(suffix) > MAX_SUFFIX_CHARS or not _SUFFIX.fullmatch(suffix) or ".." in suffix):
            raise ClientError(
                f"suffix must be up to {MAX_SUFFIX_CHARS} letters, digits, '_', '-' and '.' "
                f"(not starting with '.', no '..'), got {json.dumps(suffix)}.",
                "suffix",
                "invalid_value",
            )
        if seed is None:
            seed = secrets.randbelow(1 << 31)
        elif not 0 <= seed < 1 << 31:
            raise ClientError(
                f"seed must be an integer from 0 to 2147483647, got {json.dumps(seed)}.", "seed", "invalid_value"
            )
        train = self._training_file(training_file, "training_file", method)
        if validation_file is not None:
            self._training_file(validation_file, "validation_file", method)
        resolved = Hyperparameters.resolve(hyperparameters, self.setup.max_lora_rank, method, from_adapter)
        job_id = new_id("ftjob")
        try:
            self.check_name(fine_tuned_name(self.setup.base_model, suffix, job_id))
        except ClientError as exc:
            raise ClientError(
                f"The fine-tuned model's name would be invalid: {exc.message}.", "suffix", "invalid_value"
            ) from None

        # The job keeps its own copies of its inputs: deleting the files later does not touch it.
        try:
            for file_id in dict.fromkeys(filter(None, (training_file, validation_file))):  # the same one may be both
                if not self.objects.copy(file_key(file_id), _job_key(job_id, file_id)):
                    raise ClientError(f"The file '{file_id}' was deleted meanwhile.", "training_file", "invalid_file")
            if from_adapter:
                self._keep_init_adapter(job_id, model)
            job = JobRecord(
                id=job_id,
                created_at=int(time.time()),
                status="queued",
                model=model,
                training_file=training_file,
                validation_file=validation_file,
                hyperparameters=resolved.as_dict(),
                suffix=suffix,
                seed=seed,
                metadata=metadata,
                train_examples=train.examples,
                method=method,
            )
            self.records.insert(job)
        except BaseException:
            self.objects.delete_prefix(_job_key(job_id, ""))
            raise
        self.records.add_event(job_id, f"Created fine-tuning job: {job_id}")
        self.records.add_event(job_id, f"Validated training file: {training_file} ({train.examples} examples)")
        self.records.add_event(job_id, "Files validated, moving job to queued state")
        self._wake.set()
        return self.get(job_id)

    def _keep_init_adapter(self, job_id: str, model: str) -> None:
        with tempfile.TemporaryDirectory(dir=self.jobs_dir) as temp:
            folder = Path(temp) / INIT_ADAPTER
            if not self.copy_adapter(model, folder):
                raise ClientError(f"No fine-tuned model '{model}' on this server.", "model", "model_not_found")
            for path in folder.iterdir():
                self.objects.upload(_job_key(job_id, f"{INIT_ADAPTER}/{path.name}"), path)

    def get(self, job_id: str) -> JobRecord:
        job = self.records.get(JobRecord, job_id)
        if job is None:
            raise NotFound(f"No fine-tuning job '{job_id}'.", "fine_tuning_job_id", "job_not_found")
        return job

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job, wherever it runs (its trainer's process group is killed);
        nothing is published."""
        with self._lock:
            job = self.get(job_id)
            if job.status in ("succeeded", "failed"):
                raise ClientError(
                    f"Job {job_id} has already {job.status}; only queued or running jobs can be cancelled.",
                    "fine_tuning_job_id",
                    "job_not_cancellable",
                )
            if job.status != "cancelled":
                self._finish(job_id, "cancelled")
                if self._running is not None and self._running[0] == job_id:
                    self._running[1].terminate()  # the supervisor sees the exit and cleans up
                elif job.status == "queued":
                    self.objects.delete_prefix(_job_key(job_id, ""))
                # running on another replica: its supervisor finds its lease refused, and stops
        return self.get(job_id)

    # --- the supervisor thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            job = self._claim_next()
            if job is None:
                self._wake.wait(min(5.0, self.lease_seconds / 3))
                continue
            try:
                self._run(job)
            except Exception as exc:  # our own fault: the job fails with it and the queue goes on
                log.exception("fine-tuning job %s", job.id)
                with self._lock:
                    if self._still_ours(job.id) and not self._stopping.is_set():
                        self._fail(job.id, f"internal error running the job: {exc}")

    def _claim_next(self) -> JobRecord | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            job = self.records.claim_job(self.owner, self.lease_seconds)
            if job is None:
                return None
            checkpoint = self._stored_checkpoint(job.id)
            if checkpoint is not None:
                self.records.add_event(job.id, f"Fine-tuning job resumed from its checkpoint at step {checkpoint}")
            elif self.records.all(CheckpointRecord, job_id=job.id) or _ran_before(self.records, job.id):
                self.records.add_event(job.id, "Fine-tuning job restarted from the beginning (no checkpoint yet)")
            else:
                self.records.add_event(job.id, "Fine-tuning job started")
            return job

    def _run(self, job: JobRecord) -> None:
        job_dir = self.jobs_dir / job.id
        shutil.rmtree(job_dir, ignore_errors=True)  # what an earlier run of it on this machine left
        job_dir.mkdir(parents=True)
        resume = self._fetch_inputs(job.id, job_dir)
        with self._lock:
            if self._stopping.is_set():  # between the claim and here: back to the queue
                self.records.release_job(job.id, self.owner)
                return
            if not self._still_ours(job.id):
                return  # cancelled meanwhile
            self.training(True)
            trainer = TrainerProcess(self._trainer_run(job, resume).command(self.setup.python), job_dir)
            self._running = (job.id, trainer)
            self.records.update(JobRecord, job.id, pid=trainer.pid)
        log.info("fine-tuning job %s: trainer started (pid %d)", job.id, trainer.pid)

        events, progress = contract.EventReader(job_dir / contract.EVENTS_FILE), _Progress()
        renewed = time.monotonic()
        lost = False
        try:
            while (returncode := trainer.wait(self.poll_seconds)) is None:
                if trainer.kill_sent is not None:
                    continue
                if time.monotonic() - renewed > self.lease_seconds / 3:
                    if not self.records.renew_lease(job.id, self.owner, self.lease_seconds):
                        lost = True  # cancelled, or taken over after this replica stalled
                        trainer.terminate()
                        continue
                    renewed = time.monotonic()
                self._record(job, events.read(), progress)
            trainer.kill_group()
        finally:
            self.training(False)

        with self._lock:
            self._running = None
            status = self.get(job.id).status
            if status == "cancelled":
                log.info("fine-tuning job %s: cancelled", job.id)
                self.objects.delete_prefix(_job_key(job.id, ""))
            elif lost or not self._still_ours(job.id):
                log.warning("fine-tuning job %s: another replica holds it now; this run stops", job.id)
            elif self._stopping.is_set():
                self.records.add_event(
                    job.id, "The server is shutting down: training stopped; the job resumes from its last checkpoint"
                )
                self.records.update(JobRecord, job.id, pid=None)
                self.records.release_job(job.id, self.owner)
            else:
                self._record(job, events.read(), progress)  # what the trainer wrote last
                if returncode == 0:
                    self._succeed(job, job_dir, progress)
                else:
                    self._fail(job.id, trainer.error(returncode))
                self.objects.delete_prefix(_job_key(job.id, ""))
        _clean_job_dir(job_dir)

    def _still_ours(self, job_id: str) -> bool:
        job = self.get(job_id)
        return job.status == "running" and job.owner == self.owner

    def _fetch_inputs(self, job_id: str, job_dir: Path) -> bool:
        """Bring the job's data, starting adapter and newest checkpoint into its folder; whether
        there was a checkpoint to resume from."""
        checkpoint = self._stored_checkpoint(job_id)
        prefix = _job_key(job_id, "")
        for info in self.objects.list(prefix):
            relative = info.key[len(prefix) :]
            if relative == _CHECKPOINT:
                continue
            if relative.startswith("checkpoint-"):
                step_dir, _, rest = relative.partition("/")
                if checkpoint is None or step_dir != f"checkpoint-{checkpoint}":
                    continue  # an older one, or one whose upload did not finish
                relative = f"{contract.ADAPTER_DIR}.partial/checkpoints/step-{checkpoint:08d}/{rest}"
            target = job_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.objects.download(info.key, target)
            self.records.renew_lease(job_id, self.owner, self.lease_seconds)  # a large checkpoint takes a while
        return checkpoint is not None

    def _stored_checkpoint(self, job_id: str) -> int | None:
        found = self.objects.read(_job_key(job_id, _CHECKPOINT))
        return None if found is None else int(json.loads(found.data)["step"])

    def _keep_checkpoint(self, job_id: str, step: int, path: Path) -> None:
        """Upload the trainer's newest checkpoint for whichever replica resumes the job, then drop the
        one before it. The marker is written last: a half-uploaded checkpoint is never resumed from."""
        previous = self._stored_checkpoint(job_id)
        try:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                self.objects.upload(_job_key(job_id, f"checkpoint-{step}/{file.relative_to(path)}"), file)
                self.records.renew_lease(job_id, self.owner, self.lease_seconds)  # a large one takes a while
        except FileNotFoundError:  # the trainer already replaced it with a newer one, which comes next
            return
        self.objects.write(_job_key(job_id, _CHECKPOINT), json.dumps({"step": step}).encode())
        if previous is not None and previous != step:
            self.objects.delete_prefix(_job_key(job_id, f"checkpoint-{previous}/"))

    def _trainer_run(self, job: JobRecord, resume: bool = False) -> contract.TrainerRun:
        h, s = Hyperparameters(**job.hyperparameters), self.setup
        micro, accum = h.micro_batches
        from_adapter = (self.jobs_dir / job.id / INIT_ADAPTER).is_dir()
        return contract.TrainerRun(
            data=job.training_file,
            model=str(s.model_path),
            epochs=h.n_epochs,
            batch_size=micro,
            grad_accum=accum,
            lr=h.learning_rate,
            lora_r=None if from_adapter else h.lora_rank,
            lora_alpha=None if from_adapter else h.lora_alpha,
            lora_dropout=None if from_adapter else h.lora_dropout,
            seed=job.seed,
            save_every=contract.steps_per_epoch(job.train_examples, micro, accum),  # a checkpoint per epoch
            dtype=s.dtype,
            eval_file=job.validation_file,
            device=s.device,
            threads=s.threads,
            method=METHODS[job.method][0],
            beta=h.beta,
            init_adapter=INIT_ADAPTER if from_adapter else None,
            resume=resume,
        )

    def _record(self, job: JobRecord, events: list[contract.Event], progress: _Progress) -> None:
        """The trainer's events as job events and checkpoints."""
        for e in events:
            match e:
                case contract.StartEvent():
                    resumed = f", resuming at step {e.resumed_from_step}" if e.resumed_from_step else ""
                    self.records.add_event(job.id, f"Training {e.total_steps} steps on {e.examples} examples{resumed}")
                case contract.StepEvent():
                    progress.train_loss[e.step] = e.train_loss
                    progress.train_metrics[e.step] = e.metrics
                    data = {
                        "step": e.step,
                        "total_steps": e.total_steps,
                        "train_loss": e.train_loss,
                        "learning_rate": e.learning_rate,
                        "tokens": e.tokens,
                        "epochs": e.epochs,
                        **{f"train_{name}": value for name, value in e.metrics.items()},
                    }
                    message = f"Step {e.step}/{e.total_steps}: training loss={e.train_loss:.4f}" + _shown(e.metrics)
                    self.records.add_event(job.id, message, data=data)
                case contract.EvalEvent():
                    progress.eval_loss[e.step] = e.eval_loss
                    progress.eval_metrics[e.step] = e.metrics
                    data = {
                        "step": e.step,
                        "valid_loss": e.eval_loss,
                        **{f"valid_{name}": value for name, value in e.metrics.items()},
                    }
                    message = f"Step {e.step}: validation loss={e.eval_loss:.4f}" + _shown(e.metrics)
                    self.records.add_event(job.id, message, data=data)
                case contract.CheckpointEvent():
                    self._keep_checkpoint(job.id, e.step, self.jobs_dir / job.id / e.path)
                    name = fine_tuned_name(self.setup.base_model, job.suffix, job.id) + f":ckpt-step-{e.step}"
                    self._checkpoint(job.id, e.step, name, e.train_loss, progress.eval_loss.get(e.step))
                    self.records.add_event(job.id, f"Checkpoint created at step {e.step}")
                case contract.DoneEvent():
                    progress.done = e

    def _checkpoint(self, job_id: str, step: int, name: str, train_loss, valid_loss) -> None:
        metrics = {"step": float(step), "train_loss": train_loss, "valid_loss": valid_loss}
        checkpoint = CheckpointRecord(
            id=new_id("ftckpt"),
            job_id=job_id,
            created_at=int(time.time()),
            step_number=step,
            fine_tuned_model_checkpoint=name,
            metrics={k: v for k, v in metrics.items() if v is not None},
        )
        self.records.insert(checkpoint)

    def _succeed(self, job: JobRecord, job_dir: Path, progress: _Progress) -> None:
        adapter = job_dir / contract.ADAPTER_DIR
        name = fine_tuned_name(self.setup.base_model, job.suffix, job.id)
        done = progress.done
        if done is None:
            return self._fail(job.id, "the trainer exited without saying it finished (no 'done' event)")
        try:
            shutil.copyfile(adapter / contract.REPORT_FILE, job_dir / contract.REPORT_FILE)
        except OSError as exc:
            return self._fail(job.id, f"the trainer finished but its report cannot be read: {exc}")
        try:
            self.publish(name, adapter)
        except Exception as exc:  # the store's own refusal, said in its words
            message = exc.message if isinstance(exc, ClientError) else str(exc)
            return self._fail(job.id, f"publishing the adapter failed: {message}", code="publish_failed")
        results = self.files.add_bytes(_results_csv(progress), f"{job.id}-step_metrics.csv", RESULTS_PURPOSE)
        self._checkpoint(job.id, done.steps, name, done.final_train_loss, done.final_eval_loss)
        self.records.add_event(job.id, f"New fine-tuned model created: {name}")
        self._finish(job.id, "succeeded", fine_tuned_model=name, trained_tokens=done.tokens, result_files=[results.id])
        log.info("fine-tuning job %s: published %s", job.id, name)

    def _fail(self, job_id: str, message: str, code: str = "training_failed") -> None:
        log.warning("fine-tuning job %s failed: %s", job_id, message)
        self._finish(job_id, "failed", error={"code": code, "message": message, "param": None})

    def _finish(self, job_id: str, status: str, **fields) -> None:
        self.records.update(JobRecord, job_id, status=status, finished_at=int(time.time()), pid=None, **fields)
        message = {
            "succeeded": "The job has successfully completed",
            "cancelled": "Fine-tuning job cancelled",
            "failed": f"Fine-tuning job failed: {(fields.get('error') or {}).get('message')}",
        }[status]
        self.records.add_event(job_id, message, level="error" if status == "failed" else "info")

    def _training_file(self, file_id: str, param: str, method: str) -> FileRecord:
        record = self.records.get(FileRecord, file_id)
        if record is None:
            raise ClientError(f"Invalid {param}: no file '{file_id}'.", param, "invalid_file")
        if record.purpose != PURPOSE:
            raise ClientError(
                f"Invalid {param}: '{file_id}' has purpose '{record.purpose}', not '{PURPOSE}'.", param, "invalid_file"
            )
        wanted = METHODS[method][1]
        if (record.format or "chat") != wanted:
            kinds = {"chat": "conversations (supervised)", "preference": "preference pairs (dpo)"}
            raise ClientError(
                f"Invalid {param}: '{file_id}' holds {kinds[record.format or 'chat']}; "
                f"method '{method}' trains on {kinds[wanted]}.",
                param,
                "invalid_file",
            )
        return record


def _results_csv(progress: _Progress) -> bytes:
    """OpenAI's result file: one row per step; validation loss where it was measured; DPO's
    rewards (TRL's names) on training and validation data after them."""
    names = sorted({name for metrics in progress.train_metrics.values() for name in metrics})
    rows = [
        ",".join(["step", "train_loss", "valid_loss", *(f"train_{n}" for n in names), *(f"valid_{n}" for n in names)])
    ]
    for step, loss in sorted(progress.train_loss.items()):
        train, valid = progress.train_metrics.get(step, {}), progress.eval_metrics.get(step, {})
        cells = [loss, progress.eval_loss.get(step), *(train.get(n) for n in names), *(valid.get(n) for n in names)]
        rows.append(",".join([str(step), *("" if v is None else f"{v:.6f}" for v in cells)]))
    return ("\n".join(rows) + "\n").encode()


def _shown(metrics: dict[str, float]) -> str:
    return "".join(f", {name}={value:.4f}" for name, value in metrics.items())


def _job_key(job_id: str, name: str) -> str:
    return f"{_JOB_FILES}{job_id}/{name}"


def _ran_before(records: Records, job_id: str) -> bool:
    """Whether an earlier claim of the job started training (its events say so)."""
    return any(e.message.startswith("Fine-tuning job started") for e in records.all(EventRecord, job_id=job_id))


def _clean_job_dir(job_dir: Path) -> None:
    """Keep the log, the events and the report; drop data links, the adapter and any checkpoints."""
    if not job_dir.is_dir():
        return
    for entry in job_dir.iterdir():
        if entry.name in _KEPT_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
