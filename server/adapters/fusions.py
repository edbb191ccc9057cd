"""Fusion records: a servable id naming member adapters and the router that mixes them.

Layout under `root` (the store's sibling `fusions/` folder):

    <id>/fusion.json          the record (members, router, top_k, temperature, weights, revision)
    <id>/router.safetensors   a learned router's gates, when the router is `learned`
    .staging-*/ .trash-*/     a fusion being written or removed

A fusion is written into a staging folder and renamed into place, so it exists whole or not
at all; a crash leaves at most staging or trash folders, removed when the store is opened.
Records are immutable: to change one, delete it and create it again. Each record gets a
random `revision`, so a fusion deleted and created again under the same id is never taken
for the old one (the router cache keys on it).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from plait.server.adapters.store import InvalidAdapterId, validate_adapter_id, write_durably
from plait.server.errors import ClientError, Conflict

RouterKind = Literal["weights", "arrow", "learned"]
ROUTERS: tuple[RouterKind, ...] = ("weights", "arrow", "learned")
RECORD = "fusion.json"
ROUTER_WEIGHTS = "router.safetensors"
# Bounds that keep every router's arithmetic finite in bf16: softmax(score / temperature)
# overflows for tiny temperatures, and a huge fixed weight overflows the delta.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2
MAX_WEIGHT = 100.0
_STAGING = ".staging-"
_TRASH = ".trash-"


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
    path: Path | None = None  # the record's folder, once stored

    @property
    def router_file(self) -> Path | None:
        return self.path / ROUTER_WEIGHTS if self.path is not None and self.router == "learned" else None

    def record(self) -> dict:
        fields = asdict(self)
        del fields["path"]
        return fields


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
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for leftover in self.root.iterdir():
            if leftover.name.startswith((_STAGING, _TRASH)):
                shutil.rmtree(leftover, ignore_errors=True)

    def put(self, fusion: Fusion, router_weights: bytes | None = None) -> Fusion:
        """Store a new fusion; Conflict if the id is taken."""
        check_fusion(fusion)
        if router_weights is None and fusion.router == "learned":
            raise ClientError("A learned router needs its gates: send 'router_weights' (multipart).", "router_weights")
        if router_weights is not None and fusion.router != "learned":
            raise ClientError("Only a learned router takes 'router_weights'.", "router_weights")
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.root))
        try:
            fields = {**fusion.record(), "created": int(time.time()), "revision": uuid.uuid4().hex}
            stored = Fusion(**fields, path=self.root / fusion.id)
            write_durably(staging / RECORD, json.dumps(stored.record(), indent=2).encode())
            if router_weights is not None:
                write_durably(staging / ROUTER_WEIGHTS, router_weights)
            with self._lock:
                if stored.path.exists():
                    raise Conflict(f"A fusion '{fusion.id}' exists; delete it first.", "id", "fusion_exists")
                staging.rename(stored.path)
            return stored
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def get(self, fusion_id: str) -> Fusion | None:
        try:
            validate_adapter_id(fusion_id)
            record = json.loads((self.root / fusion_id / RECORD).read_text())
        except (InvalidAdapterId, ValueError, OSError):
            return None
        record["members"] = tuple(record["members"])
        if record.get("weights") is not None:
            record["weights"] = tuple(record["weights"])
        return Fusion(**record, path=self.root / fusion_id)

    def list(self) -> list[Fusion]:
        found = (self.get(d.name) for d in sorted(self.root.iterdir()) if not d.name.startswith("."))
        return [f for f in found if f is not None]

    def delete(self, fusion_id: str) -> bool:
        with self._lock:
            if self.get(fusion_id) is None:
                return False
            trash = Path(tempfile.mkdtemp(prefix=_TRASH, dir=self.root))
            (self.root / fusion_id).rename(trash / fusion_id)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def using(self, adapter_id: str) -> list[str]:
        """The fusions that have `adapter_id` as a member."""
        return [f.id for f in self.list() if adapter_id in f.members]
