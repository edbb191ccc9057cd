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
from plait.server.api.errors import APIError
from plait.server.fine_tuning.errors import FineTuningError
from plait.server.fine_tuning.records import UnknownCursor
from plait.server.fine_tuning.service import FineTuning

router = APIRouter()
MAX_FILES_LISTED = 10_000


def service(ctx: ServerContext) -> FineTuning:
    if ctx.fine_tuning is None:
        raise APIError(404, "Fine-tuning is not enabled on this server.", code="not_enabled")
    return ctx.fine_tuning


def guarded(fn, *args, **kwargs):
    """Run a fine-tuning call, turning what the client got wrong into its 4xx."""
    try:
        return fn(*args, **kwargs)
    except FineTuningError as exc:
        raise APIError(exc.status, exc.message, exc.param, exc.code) from None
    except UnknownCursor as exc:
        raise APIError(400, f"Invalid 'after': no '{exc}' in this list.", "after", "invalid_value") from None


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise APIError(400, f"limit must be from 1 to {most}, got {limit}.", "limit", "invalid_value")
    return limit


def page_object(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


@router.post("/v1/files", dependencies=[Depends(require_admin_key)])
async def upload_file(
    file: UploadFile | None = File(default=None),
    purpose: str | None = Form(default=None),
    ctx: ServerContext = Depends(get_context),
):
    files = service(ctx).files
    if file is None or isinstance(file, str):
        raise APIError(400, "Send the training data as the multipart field 'file'.", "file", "missing_file")
    if purpose is None:
        raise APIError(400, "Give the multipart field 'purpose' ('fine-tune').", "purpose", "missing_purpose")
    row = await asyncio.to_thread(guarded, files.add_upload, file.file, file.filename or "", purpose)
    return file_object(row)


@router.get("/v1/files", dependencies=[Depends(require_api_key)])
def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = MAX_FILES_LISTED,
    order: str = Query("desc"),
    ctx: ServerContext = Depends(get_context),
):
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got '{order}'.", "order", "invalid_value")
    where = {"purpose": purpose} if purpose else None
    rows, more = guarded(
        service(ctx).records.page,
        "files",
        where=where,
        after=after,
        limit=check_limit(limit, MAX_FILES_LISTED),
        newest_first=order == "desc",
    )
    return page_object([file_object(r) for r in rows], more)


@router.get("/v1/files/{file_id}", dependencies=[Depends(require_api_key)])
def get_file(file_id: str, ctx: ServerContext = Depends(get_context)):
    return file_object(guarded(service(ctx).files.get, file_id))


@router.get("/v1/files/{file_id}/content", dependencies=[Depends(require_api_key)])
def file_content(file_id: str, ctx: ServerContext = Depends(get_context)):
    files = service(ctx).files
    row = guarded(files.get, file_id)
    try:
        handle = open(files.root / row["id"], "rb")  # noqa: SIM115 -- closed by the response's iterator
    except FileNotFoundError:
        raise APIError(404, f"No such file: '{file_id}'.", "file_id", "file_not_found") from None

    def chunks():
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"Content-Length": str(row["bytes"])}
    )


@router.delete("/v1/files/{file_id}", dependencies=[Depends(require_admin_key)])
def delete_file(file_id: str, ctx: ServerContext = Depends(get_context)):
    guarded(service(ctx).files.delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
