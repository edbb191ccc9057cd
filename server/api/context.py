"""What every route needs: the engine, the tokenizer, the served names and the keys."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from plait.server.adapters.format import read_adapter
from plait.server.adapters.store import AdapterStore, InvalidAdapterId, StoredAdapter, is_adapter_id
from plait.server.api.errors import APIError
from plait.server.engine.adapter_slots import AdapterKey
from plait.server.engine.engine import Engine
from plait.server.fine_tuning.service import FineTuning
from plait.server.metrics import Metrics


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: object
    model_name: str
    metrics: Metrics
    store: AdapterStore
    lora_targets: dict[str, tuple[int, int]]
    max_lora_rank: int
    api_key: str | None = None
    admin_key: str | None = None
    default_max_tokens: int = 1024
    fine_tuning: FineTuning | None = None  # files and fine-tuning jobs (plait.server.fine_tuning)
    created: int = field(default_factory=lambda: int(time.time()))
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    def resolve_model(self, requested: str | None) -> tuple[AdapterKey, ...]:
        """The adapters a `model` field names: none for the base model (or when omitted)."""
        if requested is None or requested == self.model_name:
            return ()
        return (self.adapter_key(requested, "model"),)

    def adapter_key(self, adapter_id: str, param: str) -> AdapterKey:
        stored = self.store.get(adapter_id) if is_adapter_id(adapter_id) else None
        if stored is None:
            raise APIError(404, f"The model '{adapter_id}' does not exist.", param, "model_not_found")
        return AdapterKey(stored.id, stored.version, stored.path)

    def stored_adapter(self, adapter_id: str) -> StoredAdapter:
        stored = self.store.get(adapter_id) if is_adapter_id(adapter_id) else None
        if stored is None:
            raise APIError(404, f"No adapter '{adapter_id}'.", "id", "adapter_not_found")
        return stored

    def put_adapter(self, adapter_id: str, files: dict[str, bytes]) -> StoredAdapter:
        """Validate against this base model and store; raises the store's format errors."""
        if adapter_id == self.model_name:
            raise InvalidAdapterId(f"'{adapter_id}' is the base model's name")
        return self.store.put(
            adapter_id, files, lambda folder: read_adapter(folder, self.lora_targets, self.max_lora_rank)
        )

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


def get_context(request: Request) -> ServerContext:
    return request.app.state.context


def require_api_key(request: Request) -> None:
    """Inference and reading: the API key when one is configured (the admin key also works)."""
    ctx = request.app.state.context
    _check_key(request, [k for k in (ctx.api_key, ctx.admin_key) if k] if ctx.api_key else [])


def require_admin_key(request: Request) -> None:
    """Changing what is served: the admin key when one is configured, else the API key."""
    ctx = request.app.state.context
    key = ctx.admin_key or ctx.api_key
    _check_key(request, [key] if key else [], admin=ctx.admin_key is not None)


def _check_key(request: Request, accepted: list[str], admin: bool = False) -> None:
    if not accepted:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip().encode()
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in accepted):
        which = "admin key" if admin else "API key"
        raise APIError(
            401, f"Incorrect or missing {which}. Send it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
