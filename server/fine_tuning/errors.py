"""What a client got wrong about files or jobs: the routes turn it into OpenAI's error shape."""

from __future__ import annotations


class FineTuningError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
