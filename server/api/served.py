"""What a generation request runs: the base model, one adapter, several combined, or a fusion.

`resolve` turns a request's `model` and its `adapters` / `combination` extension into the
engine's keys (and, for a routed fusion, its router from the context's `RouterCache`). Every
adapter version it names is held in the store until `Served.release`, which the engine calls
when the request ends: replacing or deleting an adapter never takes the files from under a
request that already resolved it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from plait.server.adapters.fusions import Fusion
from plait.server.adapters.merge import MergeSpec
from plait.server.adapters.store import AdapterStore, StoredAdapter
from plait.server.api.context import ServerContext
from plait.server.api.protocol import AdapterWeight, Combination
from plait.server.engine import AdapterKey, MergedKey, Router, SlotKey
from plait.server.errors import ClientError, NotFound


@dataclass
class Served:
    """The name a request answers as, its (adapter, weight) pairs, and for a fusion, the record
    and (unless its weights are fixed) the router that reweights them."""

    model: str
    adapters: tuple[tuple[SlotKey, float], ...] = ()
    router: Router | None = None
    fusion: Fusion | None = None
    held: list[StoredAdapter] = field(default_factory=list)
    store: AdapterStore | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give back the store versions this request holds (once; later calls do nothing)."""
        held, self.held = self.held, []
        for stored in held:
            self.store.release(stored.id, stored.version)

    def release_after(self, count: int) -> Callable[[], None]:
        """A callback that releases the holds on its `count`-th call: one per engine request
        (choice) of this API request, each calling it once when it ends."""
        remaining = count
        lock = threading.Lock()

        def finished() -> None:
            nonlocal remaining
            with lock:
                remaining -= 1
                last = remaining == 0
            if last:
                self.release()

        return finished


def resolve(
    ctx: ServerContext, model: str | None, adapters: list[AdapterWeight] | None, combination: Combination | None
) -> Served:
    """`model` names the base model, an adapter or a fusion; the `adapters` extension instead
    lists several adapters with weights, combined as `combination` says: by default the
    weighted sum of their deltas, applied as they are; TIES and DARE as one adapter merged from
    them. Blocking (it may read adapters to build a router): call it off the event loop."""
    served = Served(ctx.model_name, store=ctx.store)
    try:
        if adapters is None:
            if combination is not None:
                raise ClientError("'combination' needs 'adapters' to combine.", "combination")
            _resolve_model(ctx, served, model)
        else:
            _resolve_adapters(ctx, served, model, adapters, combination)
    except BaseException:
        served.release()
        raise
    return served


def _resolve_model(ctx: ServerContext, served: Served, requested: str | None) -> None:
    if requested is None or requested == ctx.model_name:
        return
    served.model = requested
    fusion, stored = _lookup(ctx, requested)
    if fusion is None:
        served.held.append(stored)
        served.adapters = ((AdapterKey(stored.id, stored.version), 1.0),)
        return
    served.fusion = fusion
    keys = tuple(_hold(ctx, served, member, "model") for member in fusion.members)
    if fusion.weights is not None:
        served.adapters = tuple(zip(keys, fusion.weights, strict=True))
        return
    served.adapters = tuple((key, 1.0) for key in keys)
    served.router = ctx.routers.get(fusion, [(key.adapter_id, key.version) for key in keys])


def _resolve_adapters(
    ctx: ServerContext, served: Served, model: str | None, adapters: list[AdapterWeight], how: Combination | None
) -> None:
    if model not in (None, ctx.model_name):
        raise ClientError("With 'adapters', 'model' must be the base model or left out.", "model")
    ids = [a.id for a in adapters]
    if len(set(ids)) != len(ids):
        raise ClientError("Each adapter may appear once in 'adapters'.", "adapters")
    pairs = tuple((_hold(ctx, served, a.id, f"adapters.{i}.id"), a.weight) for i, a in enumerate(adapters))
    if how is None or how.method in ("linear", "cat"):
        served.adapters = pairs
        return
    if how.rank is not None and how.rank > ctx.max_lora_rank:
        raise ClientError(
            f"combination.rank {how.rank} is above this server's --max-lora-rank {ctx.max_lora_rank}.",
            "combination.rank",
        )
    spec = MergeSpec(how.method, how.density, how.majority_sign_method, how.rank, how.seed)
    served.adapters = ((MergedKey(pairs, spec), 1.0),)


def _lookup(ctx: ServerContext, requested: str) -> tuple[Fusion | None, StoredAdapter | None]:
    """The fusion or the (held) adapter named `requested`: first among those this replica knows,
    then in the shared store, so that serving a known name never waits for the store."""
    for refresh in (False, True):
        fusion = ctx.fusions.get(requested, refresh)
        if fusion is not None:
            return fusion, None
        stored = ctx.store.hold(requested, refresh)
        if stored is not None:
            return None, stored
    raise NotFound(f"The model '{requested}' does not exist.", "model", "model_not_found")


def _hold(ctx: ServerContext, served: Served, adapter_id: str, param: str) -> AdapterKey:
    stored = ctx.store.hold(adapter_id)
    if stored is None:
        raise NotFound(f"The model '{adapter_id}' does not exist.", param, "model_not_found")
    served.held.append(stored)
    return AdapterKey(stored.id, stored.version)
