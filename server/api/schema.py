"""What the OpenAPI document says about errors: every route lists the error statuses it returns.

Errors have one shape (`ErrorResponse`, OpenAI's). FastAPI would document its own
validation error as a 422 on every route with a body or parameters; Plait answers those
with 400, so `openapi` replaces the 422 entries with the 400 the route really returns.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_MEANING = {
    400: "Invalid request: the message says what to fix and `param` names the field",
    401: "Missing or wrong key",
    404: "No such model, adapter, fusion, file or job",
    409: "Conflicts with what exists (an id in use, a member still used)",
    413: "The body or an uploaded file is over its size limit",
    429: "Too many requests are waiting; retry later (see Retry-After)",
    503: "Starting up, shutting down, or the engine failed",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for a route that answers with these error statuses."""
    return {status: {"model": ErrorResponse, "description": _MEANING[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {
                            "description": _MEANING[400],
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                        }
            schemas = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
