"""Fusion management: a fusion is a model id made of member adapters and a router.

`POST /v1/fusions` takes JSON, `{"id", "members", "router", "top_k", "temperature",
"weights"}`; a `learned` router comes as multipart form data instead, the same JSON in field
`fusion` and the gates from `plait train-router` as file `router_weights`. Everything is
checked against the members and this base model before anything is stored.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plait.server.adapters.fusions import Fusion, check_fusion
from plait.server.adapters.routers import check_learned_router
from plait.server.api.context import ServerContext, get_context, require_admin_key, require_api_key
from plait.server.api.schema import error_responses
from plait.server.errors import ClientError, Conflict, NotFound, TooLarge

router = APIRouter()
MAX_ROUTER_BYTES = 64 << 20
DEFAULT_TOP_K = 3  # PEFT's Arrow default, capped at the number of members


class FusionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    id: str
    members: list[str] = Field(min_length=1)
    router: str
    top_k: int | None = None
    temperature: float = 1.0
    weights: list[float] | None = None


def fusion_object(fusion: Fusion, base_model: str) -> dict:
    return {
        "id": fusion.id,
        "object": "fusion",
        "created": fusion.created,
        "owned_by": "plait",
        "parent": base_model,
        "members": list(fusion.members),
        "router": fusion.router,
        "top_k": fusion.top_k,
        "temperature": fusion.temperature,
        "weights": None if fusion.weights is None else list(fusion.weights),
    }


@router.post(
    "/v1/fusions",
    status_code=201,
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 401, 409, 413),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": FusionRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["fusion"],
                        "properties": {
                            "fusion": {"type": "string", "description": "the fusion as JSON"},
                            "router_weights": {"type": "string", "format": "binary"},
                        },
                    }
                },
            },
        }
    },
)
async def create_fusion(request: Request, ctx: ServerContext = Depends(get_context)):
    body, router_weights = await _read_body(request)
    fusion = Fusion(
        id=body.id,
        members=tuple(body.members),
        router=body.router,
        top_k=body.top_k if body.top_k is not None else min(DEFAULT_TOP_K, len(body.members)),
        temperature=body.temperature,
        weights=None if body.weights is None else tuple(body.weights),
    )
    stored = await asyncio.to_thread(_create, ctx, fusion, router_weights)
    return fusion_object(stored, ctx.model_name)


@router.get("/v1/fusions", dependencies=[Depends(require_api_key)], responses=error_responses(401))
def list_fusions(ctx: ServerContext = Depends(get_context)):
    return {"object": "list", "data": [fusion_object(f, ctx.model_name) for f in ctx.fusions.list()]}


@router.get("/v1/fusions/{fusion_id}", dependencies=[Depends(require_api_key)], responses=error_responses(401, 404))
def get_fusion(fusion_id: str, ctx: ServerContext = Depends(get_context)):
    fusion = ctx.fusions.get(fusion_id)
    if fusion is None:
        raise NotFound(f"No fusion '{fusion_id}'.", "id", "fusion_not_found")
    return fusion_object(fusion, ctx.model_name)


@router.delete(
    "/v1/fusions/{fusion_id}", dependencies=[Depends(require_admin_key)], responses=error_responses(401, 404)
)
def delete_fusion(fusion_id: str, ctx: ServerContext = Depends(get_context)):
    ctx.delete_fusion(fusion_id)
    return {"id": fusion_id, "object": "fusion", "deleted": True}


async def _read_body(request: Request) -> tuple[FusionRequest, bytes | None]:
    router_weights = None
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=MAX_ROUTER_BYTES)
            raw, upload = form.get("fusion"), form.get("router_weights")
            if not isinstance(raw, str):
                raise ClientError("Send the fusion as JSON in the form field 'fusion'.", "fusion")
            if upload is not None and not isinstance(upload, str):
                router_weights = await upload.read(MAX_ROUTER_BYTES + 1)
                if len(router_weights) > MAX_ROUTER_BYTES:
                    raise TooLarge(f"router_weights is larger than {MAX_ROUTER_BYTES} bytes.", "router_weights")
            data = json.loads(raw)
        else:
            data = json.loads(await request.body())
        return FusionRequest.model_validate(data), router_weights
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past what a parser takes
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise ClientError(f"{param}: {first['msg']}", param) from None
        raise ClientError(f"The fusion is not valid JSON: {exc}", "fusion") from None


def _create(ctx: ServerContext, fusion: Fusion, router_weights: bytes | None) -> Fusion:
    """Check the fusion against the store and the base model, then store it."""
    check_fusion(fusion)
    if fusion.id == ctx.model_name or ctx.store.get(fusion.id) is not None:
        raise Conflict(f"'{fusion.id}' is already the name of a model or adapter.", "id", "model_exists")
    if ctx.fusions.get(fusion.id) is not None:
        raise Conflict(f"A fusion '{fusion.id}' exists; delete it first.", "id", "fusion_exists")
    members = []
    for i, member in enumerate(fusion.members):
        stored = ctx.store.hold(member)
        if stored is None:
            raise ClientError(f"Unknown member adapter '{member}'.", f"members.{i}", "adapter_not_found")
        try:
            members.append(ctx.read_adapter(stored.path))
        finally:
            ctx.store.release(stored.id, stored.version)
    bases = {a.base_model_name for a in members if a.base_model_name}
    if len(bases) > 1:
        raise ClientError(
            f"The members were trained on different base models ({', '.join(sorted(bases))}); "
            "a fusion combines adapters of one base.",
            "members",
        )
    if fusion.router == "learned" and router_weights is not None:
        check_learned_router(router_weights, members, ctx.lora_targets)
    return ctx.fusions.put(fusion, router_weights)
