"""`GET /v1/models` and `GET /v1/models/{id}`: the base model, every adapter and every fusion.

Each card has OpenAI's fields (`id`, `object`, `created`, `owned_by`) and those vLLM's clients
and the Kubernetes inference gateway read: `root` (the base model), `parent` (the base, for
an adapter or a fusion) and `max_model_len`. An adapter's card also says its version, rank and
target modules; a fusion's, its members and router.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from plait.server.api.adapters import adapter_object
from plait.server.api.context import ServerContext, get_context, require_api_key
from plait.server.api.fusions import fusion_object
from plait.server.api.schema import error_responses
from plait.server.errors import NotFound

router = APIRouter(dependencies=[Depends(require_api_key)])


def _base_card(ctx: ServerContext) -> dict:
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "plait",
        "root": ctx.model_name,
        "parent": None,
        "max_model_len": ctx.engine.max_model_len,
    }


def _card(ctx: ServerContext, obj: dict) -> dict:
    return {**obj, "object": "model", "root": ctx.model_name, "max_model_len": ctx.engine.max_model_len}


# Plain functions: FastAPI runs them on worker threads, as they read the stores' files.


@router.get("/v1/models", responses=error_responses(401))
def list_models(ctx: ServerContext = Depends(get_context)):
    adapters = [_card(ctx, adapter_object(ctx, a)) for a in ctx.store.list()]
    fusions = [_card(ctx, fusion_object(f, ctx.model_name)) for f in ctx.fusions.list()]
    return {"object": "list", "data": [_base_card(ctx), *adapters, *fusions]}


@router.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
def get_model(model_id: str, ctx: ServerContext = Depends(get_context)):
    if model_id == ctx.model_name:
        return _base_card(ctx)
    fusion = ctx.fusions.get(model_id)
    if fusion is not None:
        return _card(ctx, fusion_object(fusion, ctx.model_name))
    stored = ctx.store.get(model_id)
    if stored is not None:
        return _card(ctx, adapter_object(ctx, stored))
    raise NotFound(f"The model '{model_id}' does not exist.", "model", "model_not_found")
