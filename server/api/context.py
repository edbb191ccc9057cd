"""What every route needs: the engine, the tokenizer, the served names and the keys."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from fastapi import Request

from plait.server.adapters.format import read_adapter
from plait.server.adapters.fusions import Fusion, FusionStore
from plait.server.adapters.store import AdapterStore, InvalidAdapterId, StoredAdapter, is_adapter_id
from plait.server.api.errors import APIError
from plait.server.engine.adapter_slots import AdapterKey, SlotKey
from plait.server.engine.engine import Engine
from plait.server.engine.routing import Router, arrow_router, read_learned_router
from plait.server.fine_tuning.service import FineTuning
from plait.server.metrics import Metrics


@dataclass(frozen=True)
class Served:
    """What one request runs: the name it answers as, its (adapter, weight) pairs, and for a
    fusion, the record and (unless its weights are fixed) the router that reweights them."""

    model: str
    adapters: tuple[tuple[SlotKey, float], ...] = ()
    router: Router | None = None
    fusion: Fusion | None = None


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: object
    model_name: str
    metrics: Metrics
    store: AdapterStore
    fusions: FusionStore
    lora_targets: dict[str, tuple[int, int]]
    max_lora_rank: int
    api_key: str | None = None
    admin_key: str | None = None
    default_max_tokens: int = 1024
    fine_tuning: FineTuning | None = None  # files and fine-tuning jobs (plait.server.fine_tuning)
    created: int = field(default_factory=lambda: int(time.time()))
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)
    _routers: dict[tuple, Router] = field(default_factory=dict, repr=False)

    def resolve_model(self, requested: str | None) -> Served:
        """What a `model` field names: the base model (or nothing), an adapter, or a fusion."""
        if requested is None or requested == self.model_name:
            return Served(self.model_name)
        fusion = self.fusions.get(requested)
        if fusion is None:
            return Served(requested, ((self.adapter_key(requested, "model"), 1.0),))
        keys = tuple(self.adapter_key(member, "model") for member in fusion.members)
        if fusion.weights is not None:
            return Served(requested, tuple(zip(keys, fusion.weights, strict=True)), fusion=fusion)
        return Served(requested, tuple((key, 1.0) for key in keys), self._router(fusion, keys), fusion)

    def _router(self, fusion: Fusion, keys: tuple[AdapterKey, ...]) -> Router:
        """A fusion's router for these member versions, built once (reading every member)."""
        cache_key = (fusion.id, fusion.created, keys)
        router = self._routers.get(cache_key)
        if router is None:
            members = [read_adapter(key.path, self.lora_targets, self.max_lora_rank) for key in keys]
            if fusion.router == "arrow":
                router = arrow_router(members, fusion.top_k, fusion.temperature)
            else:
                router = read_learned_router(fusion.router_file, members, fusion.top_k, fusion.temperature)
            router = self._routers[cache_key] = router.to(self.engine.device)
        return router

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
        if self.fusions.get(adapter_id) is not None:
            raise InvalidAdapterId(f"'{adapter_id}' is a fusion's name")
        stored = self.store.put(
            adapter_id, files, lambda folder: read_adapter(folder, self.lora_targets, self.max_lora_rank)
        )
        self._forget(adapter_id, keep_version=stored.version)
        return stored

    def delete_adapter(self, adapter_id: str) -> None:
        """Remove an adapter from the store, unless a fusion still uses it."""
        self.stored_adapter(adapter_id)
        users = self.fusions.using(adapter_id)
        if users:
            raise APIError(
                409,
                f"The adapter '{adapter_id}' is a member of the fusion(s) {', '.join(users)}; delete those first.",
                "id",
                "adapter_in_use",
            )
        self.store.delete(adapter_id)
        self._forget(adapter_id)

    def _forget(self, adapter_id: str, keep_version: int | None = None) -> None:
        """Free what the engine and the router cache hold of the adapter's other versions."""
        self.engine.forget_adapter(adapter_id, keep_version)
        self._routers = {
            (fusion, created, keys): router
            for (fusion, created, keys), router in self._routers.items()
            if not any(key.superseded(adapter_id, keep_version) for key in keys)
        }

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
