"""Errors about an adapter a client sent; each message says what to fix."""

from __future__ import annotations

from plait.server.errors import ClientError


class AdapterFormatError(ClientError):
    """The adapter's files cannot be served as they are.

    `param` names the config field, tensor key or file at fault (None when no single one is).
    """

    code = "invalid_adapter"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"Invalid adapter: {message}", field)


class AdapterTooLarge(AdapterFormatError):
    """An upload is over the size limit (413 rather than 400)."""

    status = 413
    code = None

    def __init__(self, message: str, field: str | None = None):
        ClientError.__init__(self, message, field)
