"""Fusion records: a servable id naming member adapters and the router that mixes them.

Objects (`plait.server.storage.objects`, shared by every replica):

    fusions/<id>/fusion.json                     the record (members, router, top_k, temperature,
                                                 weights, revision)
    fusions/<id>/router-<revision>.safetensors   a learned router's gates, when the router is `learned`

A fusion is created by a conditional write of its record (`if_absent`), after its router's
gates, so it exists whole or not at all, and of two replicas creating one id at once exactly
one succeeds; the other gets a 409 and removes its gates. Records are immutable: to change
one, delete it and create it again. Each record gets a random `revision`, so a fusion deleted
and created again under the same id is never taken for the old one (the router cache keys on
it). Like the adapter store, each replica answers from the records it knows, looks an unknown
id up in the store, and `refresh` tells `watch`ers about fusions changed elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from plait.server.adapters.store import InvalidAdapterId, is_adapter_id, validate_adapter_id
from plait.server.errors import ClientError, Conflict
from plait.server.storage.objects import ObjectStore, PreconditionFailed

log = logging.getLogger("plait.adapters")

RouterKind = Literal["weights", "arrow", "learned"]
ROUTERS: tuple[RouterKind, ...] = ("weights", "arrow", "learned")
_FUSIONS = "fusions/"
_RECORD = "/fusion.json"
# Bounds that keep every router's arithmetic finite in bf16: softmax(score / temperature)
# overflows for tiny temperatures, and a huge fixed weight overflows the delta.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class Fusion:
    id: str
    members: tuple[str, ...]  # adapter ids, in the order the router's outputs follow
    router: RouterKind
    top_k: int  # members each token uses (all of them for `weights`)
    temperature: float = 1.0  # softmax temperature of `arrow` and `learned`
    weights: tuple[float, ...] | None = None  # the `weights` router's fixed weights
    created: int = 0
    revision: str = ""  # random per stored record: tells a re-created fusion from the old one

    def record(self) -> dict:
        return asdict(self)


def check_fusion(fusion: Fusion) -> None:
    """Raise ClientError naming the field when a fusion cannot be served as described."""
    try:
        validate_adapter_id(fusion.id)
    except InvalidAdapterId as exc:
        raise ClientError(exc.message, "id", "invalid_fusion_id") from None
    if fusion.router not in ROUTERS:
        _invalid("router", f"unknown router {fusion.router!r}; one of {', '.join(ROUTERS)}")
    if len(fusion.members) < 1:
        _invalid("members", "a fusion needs at least one member adapter")
    if len(set(fusion.members)) != len(fusion.members):
        _invalid("members", "each adapter may appear once")
    if not 1 <= fusion.top_k <= len(fusion.members):
        _invalid("top_k", f"must be between 1 and the number of members ({len(fusion.members)})")
    if not MIN_TEMPERATURE <= fusion.temperature <= MAX_TEMPERATURE:
        _invalid("temperature", f"must be from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}")
    if (fusion.weights is not None) != (fusion.router == "weights"):
        _invalid("weights", "give them with the `weights` router, and only with it")
    if fusion.weights is not None:
        if len(fusion.weights) != len(fusion.members):
            _invalid("weights", f"{len(fusion.weights)} weights for {len(fusion.members)} members")
        if not all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for w in fusion.weights):
            _invalid("weights", f"each must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")


def _invalid(field: str, message: str) -> None:
    raise ClientError(f"Invalid fusion: {field}: {message}", field)


class FusionStore:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self._lock = threading.Lock()
        self._known: dict[str, tuple[str, Fusion]] = {}  # id: (etag of its record, the record)
        self._watchers: list[Callable[[str], None]] = []
        self.refresh()

    def watch(self, changed: Callable[[str], None]) -> None:
        """Call `changed(id)` whenever `refresh` finds a fusion created, deleted or re-created elsewhere."""
        self._watchers.append(changed)

    def put(self, fusion: Fusion, router_weights: bytes | None = None) -> Fusion:
        """Store a new fusion; Conflict if the id is taken."""
        check_fusion(fusion)
        if router_weights is None and fusion.router == "learned":
            raise ClientError("A learned router needs its gates: send 'router_weights' (multipart).", "router_weights")
        if router_weights is not None and fusion.router != "learned":
            raise ClientError("Only a learned router takes 'router_weights'.", "router_weights")
        stored = Fusion(**{**fusion.record(), "created": int(time.time()), "revision": uuid.uuid4().hex})
        if router_weights is not None:
            self.objects.write(_router_key(stored), router_weights)
        try:
            etag = self.objects.write(_record_key(stored.id), json.dumps(stored.record()).encode(), if_absent=True)
        except PreconditionFailed:
            if router_weights is not None:
                self.objects.delete(_router_key(stored))
            raise Conflict(f"A fusion '{fusion.id}' exists; delete it first.", "id", "fusion_exists") from None
        with self._lock:
            self._known[stored.id] = (etag, stored)
        return stored

    def get(self, fusion_id: str, refresh: bool = True) -> Fusion | None:
        """The fusion, from what this replica knows or (unless `refresh` is False) from the store."""
        with self._lock:
            known = self._known.get(fusion_id)
        if known is not None:
            return known[1]
        if not refresh or not is_adapter_id(fusion_id):
            return None
        found = self._read(fusion_id)
        if found is None:
            return None
        with self._lock:
            self._known[fusion_id] = found
        return found[1]

    def list(self) -> list[Fusion]:
        """Every fusion, by id, as the store has them now."""
        self.refresh()
        with self._lock:
            return [fusion for _, (_, fusion) in sorted(self._known.items())]

    def delete(self, fusion_id: str) -> bool:
        found = self._read(fusion_id) if is_adapter_id(fusion_id) else None
        if found is None:
            with self._lock:
                self._known.pop(fusion_id, None)
            return False
        etag, fusion = found
        try:
            self.objects.delete(_record_key(fusion_id), if_match=etag)
        except PreconditionFailed:
            return False  # deleted (or deleted and created again) by another replica meanwhile
        if fusion.router == "learned":
            self.objects.delete(_router_key(fusion))
        with self._lock:
            self._known.pop(fusion_id, None)
        return True

    def router_weights(self, fusion: Fusion) -> bytes:
        """A learned router's gates (safetensors bytes)."""
        found = self.objects.read(_router_key(fusion))
        if found is None:
            raise ClientError(f"The fusion '{fusion.id}' was deleted meanwhile.", "model", "model_not_found", 404)
        return found.data

    def using(self, adapter_id: str) -> list[str]:
        """The fusions that have `adapter_id` as a member."""
        return [f.id for f in self.list() if adapter_id in f.members]

    def refresh(self) -> None:
        """Catch up with the store, telling watchers which fusions changed."""
        listed = {
            info.key[len(_FUSIONS) : -len(_RECORD)]: info.etag
            for info in self.objects.list(_FUSIONS)
            if info.key.endswith(_RECORD)
        }
        with self._lock:
            known = {fusion_id: etag for fusion_id, (etag, _) in self._known.items()}
        changed = known.keys() - listed.keys()  # deleted
        changed |= {fusion_id for fusion_id in known.keys() & listed.keys() if known[fusion_id] != listed[fusion_id]}
        for fusion_id in changed | (listed.keys() - known.keys()):
            found = self._read(fusion_id) if is_adapter_id(fusion_id) else None
            with self._lock:
                if found is None:
                    self._known.pop(fusion_id, None)
                else:
                    self._known[fusion_id] = found
        for fusion_id in sorted(changed):
            for watcher in self._watchers:
                watcher(fusion_id)

    def _read(self, fusion_id: str) -> tuple[str, Fusion] | None:
        found = self.objects.read(_record_key(fusion_id))
        if found is None:
            return None
        try:
            record = json.loads(found.data)
            record["members"] = tuple(record["members"])
            if record.get("weights") is not None:
                record["weights"] = tuple(record["weights"])
            record.pop("path", None)  # written by older versions
            return found.etag, Fusion(**record)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("fusion store: the record of %r cannot be read (%s); skipping it", fusion_id, exc)
            return None


def _record_key(fusion_id: str) -> str:
    return f"{_FUSIONS}{fusion_id}{_RECORD}"


def _router_key(fusion: Fusion) -> str:
    return f"{_FUSIONS}{fusion.id}/router-{fusion.revision}.safetensors"


def migrate_fusion_layout(objects: ObjectStore) -> None:
    """Give learned routers stored by an older Plait (`router.safetensors`) their revision's name."""
    for info in objects.list(_FUSIONS):
        if info.key.endswith("/router.safetensors"):
            fusion_id = info.key[len(_FUSIONS) :].split("/")[0]
            record = objects.read(_record_key(fusion_id))
            if record is not None:
                revision = json.loads(record.data).get("revision", "")
                objects.copy(info.key, f"{_FUSIONS}{fusion_id}/router-{revision}.safetensors")
            objects.delete(info.key)
