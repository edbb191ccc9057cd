"""What a client got wrong, as one exception type that every layer of the server raises.

`ClientError` carries an HTTP status and the fields of OpenAI's error shape (`message`,
`param`, `code`). Layers below the API raise it, or a subclass that names a kind of refusal
(`AdapterFormatError`, `EngineBusy`, ...); the API turns every one into `{"error": {...}}`
with its status through a single exception handler (`plait.server.api.errors`). Nothing
else about HTTP leaks below the API. This module imports nothing of plait, so any layer
may use it.
"""

from __future__ import annotations


class ClientError(Exception):
    """A request the client must change. Subclasses set `status` and `code` as class defaults."""

    status: int = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotFound(ClientError):
    status = 404


class Conflict(ClientError):
    status = 409


class TooLarge(ClientError):
    status = 413
