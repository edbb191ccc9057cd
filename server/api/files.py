"""OpenAI's Files API, for fine-tuning data: upload, list, inspect, read back and delete.

`POST /v1/files` takes multipart form data, `file` and `purpose="fine-tune"`; the file is
checked line by line before it is kept (see `plait.server.fine_tuning.files`) and a refused
one leaves nothing behind. Uploading and deleting need the admin key; reading, the API key.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from plait.server.api.context import ServerContext, get_context, require_admin_key, require_api_key
from plait.server.api.schema import error_responses
from plait.server.errors import ClientError, NotFound
from plait.server.fine_tuning.records import FileRecord
from plait.server.fine_tuning.service import FineTuning

router = APIRouter()
MAX_FILES_LISTED = 10_000


def service(ctx: ServerContext) -> FineTuning:
    if ctx.fine_tuning is None:
        raise NotFound("Fine-tuning is not enabled on this server.", code="not_enabled")
    return ctx.fine_tuning


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise ClientError(f"limit must be from 1 to {most}, got {limit}.", "limit", "invalid_value")
    return limit


def page_object(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def file_object(record: FileRecord) -> dict:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


@router.post("/v1/files", dependencies=[Depends(require_admin_key)], responses=error_responses(400, 401, 404, 413))
async def upload_file(
    file: UploadFile | None = File(default=None),
    purpose: str | None = Form(default=None),
    ctx: ServerContext = Depends(get_context),
):
    files = service(ctx).files
    if file is None or isinstance(file, str):
        raise ClientError("Send the training data as the multipart field 'file'.", "file", "missing_file")
    if purpose is None:
        raise ClientError("Give the multipart field 'purpose' ('fine-tune').", "purpose", "missing_purpose")
    record = await asyncio.to_thread(files.add_upload, file.file, file.filename or "", purpose)
    return file_object(record)


@router.get("/v1/files", dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404))
def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = MAX_FILES_LISTED,
    order: str = Query("desc"),
    ctx: ServerContext = Depends(get_context),
):
    if order not in ("asc", "desc"):
        raise ClientError(f"order must be 'asc' or 'desc', got '{order}'.", "order", "invalid_value")
    records, more = service(ctx).records.page(
        FileRecord,
        where={"purpose": purpose} if purpose else None,
        after=after,
        limit=check_limit(limit, MAX_FILES_LISTED),
        newest_first=order == "desc",
    )
    return page_object([file_object(r) for r in records], more)


@router.get("/v1/files/{file_id}", dependencies=[Depends(require_api_key)], responses=error_responses(401, 404))
def get_file(file_id: str, ctx: ServerContext = Depends(get_context)):
    return file_object(service(ctx).files.get(file_id))


@router.get(
    "/v1/files/{file_id}/content",
    dependencies=[Depends(require_api_key)],
    responses={**error_responses(401, 404), 200: {"content": {"application/octet-stream": {}}}},
)
def file_content(file_id: str, ctx: ServerContext = Depends(get_context)):
    files = service(ctx).files
    record = files.get(file_id)
    handle = files.open(file_id)

    def chunks():
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"Content-Length": str(record.bytes)}
    )


@router.delete("/v1/files/{file_id}", dependencies=[Depends(require_admin_key)], responses=error_responses(401, 404))
def delete_file(file_id: str, ctx: ServerContext = Depends(get_context)):
    service(ctx).files.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
