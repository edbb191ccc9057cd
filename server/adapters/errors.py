"""Errors about an adapter a client sent; each message says what to fix."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """The adapter's files cannot be served as they are.

    `field` names the config field, tensor key or file at fault (None when no single one is),
    so the API can return it as the error's `param`.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class AdapterTooLarge(AdapterFormatError):
    """An upload is over the size limit; the API answers it with 413 rather than 400."""
