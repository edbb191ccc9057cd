"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Whatever a client sends, the answer is a 4xx with a message that says what to fix; a 500
is only ever our own fault, and even then it carries no stack trace. Every layer raises
`plait.server.errors.ClientError` for what the client got wrong; one handler here answers
it. FastAPI's own validation errors and Starlette's HTTP errors (unknown route, wrong
method, a body over the limit) get the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plait.server.errors import ClientError

log = logging.getLogger("plait.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past its limit; an HTTP exception, so FastAPI passes it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit} bytes.")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    }


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}.get(status)
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic names the member of a union it tried ("str", "list[...]"); the client only
    # needs the field's own path.
    loc = [p for p in loc if not (p[:1].isalpha() and ("[" in p or p in {"str", "int", "float", "bool"}))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
        return f"Unrecognized request argument supplied: {param}.", param
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    if param is None:
        return f"Invalid request body: {message}.", None
    return f"Invalid value for '{param}': {message}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_value" if param else "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "Unknown route. See /docs for the API."
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "The server had an internal error while processing the request.")
