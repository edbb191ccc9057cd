"""What every route needs: the engine, the tokenizer, the served names and the keys."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from plait.server.api.errors import APIError
from plait.server.engine.engine import Engine
from plait.server.metrics import Metrics


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: object
    model_name: str
    metrics: Metrics
    api_key: str | None = None
    default_max_tokens: int = 1024
    created: int = field(default_factory=lambda: int(time.time()))
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    def resolve_model(self, requested: str | None) -> str:
        """The model id a request names; omitted means the base model."""
        if requested is None or requested == self.model_name:
            return self.model_name
        raise APIError(404, f"The model '{requested}' does not exist.", "model", "model_not_found")

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


def get_context(request: Request) -> ServerContext:
    return request.app.state.context


def require_api_key(request: Request) -> None:
    key = request.app.state.context.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
