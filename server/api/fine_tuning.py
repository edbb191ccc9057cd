"""OpenAI's fine-tuning jobs API: create, list, inspect and cancel jobs; their events and checkpoints.

A job trains a LoRA adapter for the server's own base model on an uploaded file and publishes
it as `ft:<base>:<suffix>:<job id>`, servable at once (see `plait.server.fine_tuning.jobs`).
`model` names the base model, or a fine-tuned model of it to continue from. `method.type` is
`supervised` (conversations) or `dpo` (preference pairs, measured against the starting
point). `hyperparameters` takes OpenAI's `n_epochs`, `batch_size`, `learning_rate_multiplier`
and, for DPO, `beta`, and Plait's extension `lora_rank`, `lora_alpha` and `lora_dropout`; the
same object may come as `method.supervised.hyperparameters` or `method.dpo.hyperparameters`. Creating and
cancelling need the admin key; reading, the API key.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from plait.server.api.context import ServerContext, get_context, require_admin_key, require_api_key
from plait.server.api.files import check_limit, page_object, service
from plait.server.api.schema import error_responses
from plait.server.errors import ClientError
from plait.server.fine_tuning.records import CheckpointRecord, EventRecord, JobRecord

router = APIRouter()
ORGANIZATION = "plait"


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MethodSettings(_Body):
    hyperparameters: dict[str, Any] | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodSettings | None = None
    dpo: MethodSettings | None = None


class CreateJobRequest(_Body):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list | None = None

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    def merged_hyperparameters(self) -> dict[str, Any] | None:
        kind = self.method_type
        if kind == "reinforcement":
            raise ClientError(
                "Reinforcement fine-tuning is not supported; method.type may be 'supervised' or 'dpo'.",
                "method.type",
                "invalid_value",
            )
        other = "dpo" if kind == "supervised" else "supervised"
        if self.method is not None and getattr(self.method, other) is not None:
            raise ClientError(f"method.{other} does not go with method.type '{kind}'.", f"method.{other}")
        settings = getattr(self.method, kind, None) if self.method is not None else None
        nested = settings.hyperparameters if settings is not None else None
        if nested is not None and self.hyperparameters is not None:
            raise ClientError(
                f"Give hyperparameters either at the top level or in method.{kind}, not both.",
                "hyperparameters",
                "invalid_value",
            )
        return nested if nested is not None else self.hyperparameters


def job_object(job: JobRecord) -> dict:
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": job.hyperparameters,
        "model": job.model,
        "organization_id": ORGANIZATION,
        "result_files": job.result_files,
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.metadata,
        "method": {"type": job.method, job.method: {"hyperparameters": job.hyperparameters}},
        "user_provided_suffix": job.suffix,
    }


def event_object(event: EventRecord) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": event.id,
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def checkpoint_object(checkpoint: CheckpointRecord) -> dict:
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at,
        "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": checkpoint.metrics,
        "step_number": checkpoint.step_number,
    }


@router.post(
    "/v1/fine_tuning/jobs", dependencies=[Depends(require_admin_key)], responses=error_responses(400, 401, 404)
)
def create_job(body: CreateJobRequest, ctx: ServerContext = Depends(get_context)):
    if body.integrations:
        raise ClientError("integrations are not supported.", "integrations", "invalid_value")
    job = service(ctx).jobs.create(
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        hyperparameters=body.merged_hyperparameters(),
        suffix=body.suffix,
        seed=body.seed,
        metadata=body.metadata,
        method=body.method_type,
    )
    return job_object(job)


@router.get("/v1/fine_tuning/jobs", dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404))
def list_jobs(after: str | None = None, limit: int = 20, ctx: ServerContext = Depends(get_context)):
    jobs, more = service(ctx).records.page(JobRecord, after=after, limit=check_limit(limit, 100))
    return page_object([job_object(j) for j in jobs], more)


@router.get(
    "/v1/fine_tuning/jobs/{job_id}", dependencies=[Depends(require_api_key)], responses=error_responses(401, 404)
)
def get_job(job_id: str, ctx: ServerContext = Depends(get_context)):
    return job_object(service(ctx).jobs.get(job_id))


@router.post(
    "/v1/fine_tuning/jobs/{job_id}/cancel",
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 401, 404),
)
def cancel_job(job_id: str, ctx: ServerContext = Depends(get_context)):
    return job_object(service(ctx).jobs.cancel(job_id))


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/events",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 404),
)
def list_events(job_id: str, after: str | None = None, limit: int = 20, ctx: ServerContext = Depends(get_context)):
    fine_tuning = service(ctx)
    fine_tuning.jobs.get(job_id)
    events, more = fine_tuning.records.page(
        EventRecord, where={"job_id": job_id}, after=after, limit=check_limit(limit, 1000)
    )
    return page_object([event_object(e) for e in events], more)


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/checkpoints",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 404),
)
def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10, ctx: ServerContext = Depends(get_context)):
    fine_tuning = service(ctx)
    fine_tuning.jobs.get(job_id)
    checkpoints, more = fine_tuning.records.page(
        CheckpointRecord, where={"job_id": job_id}, after=after, limit=check_limit(limit, 100)
    )
    return page_object([checkpoint_object(c) for c in checkpoints], more)
