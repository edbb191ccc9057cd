"""Adapter management: upload, list, inspect and delete adapters in the store.

`POST /v1/adapters` takes multipart form data: the adapter id as field `id` and either the
two PEFT files (`adapter_config.json`, `adapter_model.safetensors`) or one zip/tar archive
of them as `files`. A replacement under an existing id is atomic for requests: those
already resolved finish on the old weights, new ones get the new. vLLM's
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` work too, reading from a local path.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict

from plait.server.adapters.base_identity import base_model_warning
from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from plait.server.adapters.store import StoredAdapter
from plait.server.adapters.uploads import files_from_archive
from plait.server.api.context import ServerContext, get_context, require_admin_key, require_api_key
from plait.server.api.schema import error_responses
from plait.server.errors import ClientError, NotFound, TooLarge

router = APIRouter()
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def adapter_object(ctx: ServerContext, stored: StoredAdapter) -> dict:
    warning = base_model_warning(stored.base_model_name, ctx.base_identities)
    return {
        "id": stored.id,
        "object": "adapter",
        "created": stored.created,
        "owned_by": "plait",
        "parent": ctx.model_name,
        "version": stored.version,
        "rank": stored.rank,
        "target_modules": list(stored.target_modules),
        "size_bytes": stored.size_bytes,
        "base_model_name_or_path": stored.base_model_name,
        "warnings": [warning] if warning else [],
    }


@router.post(
    "/v1/adapters",
    status_code=201,
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 401, 409, 413),
)
async def upload_adapter(
    id: str = Form(...), files: list[UploadFile] = File(default=[]), ctx: ServerContext = Depends(get_context)
):
    if not files:
        raise ClientError(
            f"Send the adapter as 'files': {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, or one archive.", "files"
        )
    budget = ctx.store.max_bytes
    contents = {}
    for f in files:
        data = await f.read(budget + 1)
        if len(data) > budget:
            raise TooLarge(f"The upload is larger than {budget} bytes.", "files")
        contents[Path(f.filename or "").name] = data
    if len(contents) == 1 and next(iter(contents)) not in ADAPTER_FILES:
        archive = io.BytesIO(next(iter(contents.values())))
        contents = await asyncio.to_thread(files_from_archive, archive, budget)
    stored = await asyncio.to_thread(ctx.put_adapter, id, contents)
    return adapter_object(ctx, stored)


@router.get("/v1/adapters", dependencies=[Depends(require_api_key)], responses=error_responses(401))
def list_adapters(ctx: ServerContext = Depends(get_context)):
    return {"object": "list", "data": [adapter_object(ctx, a) for a in ctx.store.list()]}


@router.get("/v1/adapters/{adapter_id}", dependencies=[Depends(require_api_key)], responses=error_responses(401, 404))
def get_adapter(adapter_id: str, ctx: ServerContext = Depends(get_context)):
    return adapter_object(ctx, ctx.stored_adapter(adapter_id))


@router.delete(
    "/v1/adapters/{adapter_id}", dependencies=[Depends(require_admin_key)], responses=error_responses(401, 404, 409)
)
def delete_adapter(adapter_id: str, ctx: ServerContext = Depends(get_context)):
    ctx.delete_adapter(adapter_id)
    return {"id": adapter_id, "object": "adapter", "deleted": True}


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter already loaded under lora_name, as in vLLM


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; adapters here are named, so it is not needed


@router.post(
    "/v1/load_lora_adapter",
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(400, 401, 404, 409, 413),
)
def load_lora_adapter(body: LoadLoRARequest, ctx: ServerContext = Depends(get_context)):
    folder = Path(body.lora_path).expanduser()
    try:
        found = folder.is_dir()
    except (OSError, ValueError):  # a path the system cannot even look up (NUL bytes, too long)
        found = False
    if not found:
        raise NotFound(f"No adapter folder at lora_path '{body.lora_path}'.", "lora_path", "adapter_not_found")
    if not body.load_inplace and ctx.store.get(body.lora_name) is not None:
        raise ClientError(
            f"The lora adapter '{body.lora_name}' has already been loaded. If you want to load the adapter "
            "in place, set 'load_inplace' to True.",
            "lora_name",
            "adapter_exists",
        )
    stored = ctx.put_adapter_folder(body.lora_name, folder)
    return adapter_object(ctx, stored)


@router.post(
    "/v1/unload_lora_adapter", dependencies=[Depends(require_admin_key)], responses=error_responses(400, 401, 404, 409)
)
def unload_lora_adapter(body: UnloadLoRARequest, ctx: ServerContext = Depends(get_context)):
    ctx.delete_adapter(body.lora_name)
    return {"id": body.lora_name, "object": "adapter", "deleted": True}
