"""Routers: per token and per LoRA layer, how much of each fusion member's delta to add.

Built here from fusion records and their member adapters, applied by the engine (which sees
only `plait.server.engine.Router`'s one method, `weights`).

A router holds, for every module some member adapts, one gate row per member over the
module's input features. A token's scores are its input projected on those rows; the
`top_k` best members get softmax(score / temperature) and the rest 0. Members that do not
adapt a module take no part in routing there.

- `arrow` (Ostapenko et al. 2024): the row of member i is the top right singular vector of
  its ΔWᵢ = Bᵢ·Aᵢ at that module, and the score is |x·row| (a singular vector's sign is
  arbitrary). Training-free, computed from the adapters themselves, as PEFT's Arrow does.
- `learned`: rows and a bias trained by `plait train-router` to tell the members' data
  apart (in the spirit of AdapterFusion and X-LoRA); the score is x·row + bias.

The fixed-weights router needs none of this: its weights are the same for every token and
ride in the segment metadata as weighted slots.

`RouterCache` builds each fusion's router once per record and member versions, and is shared
by the HTTP worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import safetensors.torch
import torch
from safetensors import SafetensorError

from plait.server.adapters.format import LoRAAdapter, LoRAWeights
from plait.server.adapters.fusions import Fusion
from plait.server.errors import ClientError


@dataclass(frozen=True)
class Gate:
    rows: torch.Tensor  # float32 [members, in_features]
    bias: torch.Tensor | None  # float32 [members], learned routers only
    present: torch.Tensor  # bool [members]: which members adapt this module


class Router:
    def __init__(
        self, kind: str, gates: Mapping[str, Gate], top_k: int, temperature: float = 1.0, identity: tuple | None = None
    ):
        self.kind = kind
        self.gates = dict(gates)
        self.top_k = top_k
        self.temperature = temperature
        self.identity = identity  # what it was built from, stably (see plait.server.engine.Router)

    def to(self, device: torch.device) -> Router:
        moved = {
            path: Gate(g.rows.to(device), None if g.bias is None else g.bias.to(device), g.present.to(device))
            for path, g in self.gates.items()
        }
        return Router(self.kind, moved, self.top_k, self.temperature, self.identity)

    def weights(self, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """float32 [tokens, members] routing weights of the rows of `x` at module `path`
        (None where no member adapts it); each row sums to 1 over its top-k members."""
        gate = self.gates.get(path)
        if gate is None:
            return None
        scores = x.float() @ gate.rows.t()
        scores = scores.abs() if gate.bias is None else scores + gate.bias
        scores = scores.masked_fill(~gate.present, float("-inf"))
        k = min(self.top_k, int(gate.present.sum()))
        top, members = scores.topk(k, dim=1)
        return torch.zeros_like(scores).scatter_(1, members, torch.softmax(top / self.temperature, dim=1))


def arrow_router(members: Sequence[LoRAAdapter], top_k: int, temperature: float = 1.0) -> Router:
    """Arrow's prototypes, computed from the members' weights."""
    paths = dict.fromkeys(path for adapter in members for path in adapter.modules)
    gates = {}
    for path in paths:
        weights = [adapter.modules.get(path) for adapter in members]
        width = next(w.a.shape[1] for w in weights if w is not None)
        rows = torch.stack([_top_direction(w) if w is not None else torch.zeros(width) for w in weights])
        gates[path] = Gate(rows, None, torch.tensor([w is not None for w in weights]))
    return Router("arrow", gates, top_k, temperature)


def _top_direction(w: LoRAWeights) -> torch.Tensor:
    """Top right singular vector of B·A, without forming it: B = QR, so B·A = Q·(R·A)."""
    _, r = torch.linalg.qr(w.b.double())
    return torch.linalg.svd(r @ w.a.double(), full_matrices=False).Vh[0].float()


def learned_router(
    tensors: Mapping[str, torch.Tensor], members: Sequence[LoRAAdapter], top_k: int, temperature: float = 1.0
) -> Router:
    """A learned router's gates (`<module>.weight` [members, in], `<module>.bias` [members])."""
    gates = {}
    for module in dict.fromkeys(p for adapter in members for p in adapter.modules):
        present = torch.tensor([module in adapter.modules for adapter in members])
        gates[module] = Gate(tensors[f"{module}.weight"].float(), tensors[f"{module}.bias"].float(), present)
    return Router("learned", gates, top_k, temperature)


def check_learned_router(data: bytes, members: Sequence[LoRAAdapter], targets: Mapping[str, tuple[int, int]]) -> None:
    """Raise ClientError naming the tensor when a learned router's file does not fit these members."""
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ClientError(f"Invalid router_weights: {exc}", "router_weights") from None
    for module in dict.fromkeys(p for adapter in members for p in adapter.modules):
        in_features = targets[module][0]
        for name, shape in ((f"{module}.weight", (len(members), in_features)), (f"{module}.bias", (len(members),))):
            t = tensors.get(name)
            if t is None:
                problem = f"no tensor {name!r}; every module a member adapts needs a gate"
            elif tuple(t.shape) != shape:
                problem = f"{name!r} is {tuple(t.shape)}, expected {shape}"
            elif not torch.isfinite(t).all():
                problem = f"{name!r} holds NaN or infinite values"
            else:
                continue
            raise ClientError(f"Invalid router_weights: router_weights: {problem}", "router_weights")


class RouterCache:
    """Each routed fusion's router, built once per fusion record and member versions.

    `read_member(adapter_id, version)` reads one member adapter, `read_gates(fusion)` a learned
    router's safetensors bytes. Building reads every member, so it runs outside the lock; what
    `forget_*` drops meanwhile is not cached afterwards.
    """

    def __init__(
        self,
        read_member: Callable[[str, int], LoRAAdapter],
        read_gates: Callable[[Fusion], bytes],
        device: torch.device,
    ):
        self._read_member = read_member
        self._read_gates = read_gates
        self._device = device
        self._lock = threading.Lock()
        self._routers: dict[tuple, Router] = {}
        self._forgets = 0  # bumped by every forget, so a build that overlapped one is not cached

    def get(self, fusion: Fusion, versions: Sequence[tuple[str, int]]) -> Router:
        """The router of a fusion whose members are at these (id, version)s."""
        key = (fusion.id, fusion.revision, tuple(versions))
        with self._lock:
            router = self._routers.get(key)
            forgets = self._forgets
        if router is not None:
            return router
        members = [self._read_member(adapter_id, version) for adapter_id, version in versions]
        if fusion.router == "arrow":
            router = arrow_router(members, fusion.top_k, fusion.temperature)
        else:
            tensors = safetensors.torch.load(self._read_gates(fusion))
            router = learned_router(tensors, members, fusion.top_k, fusion.temperature)
        router = router.to(self._device)
        router.identity = key
        with self._lock:
            if self._forgets == forgets:
                self._routers[key] = router
        return router

    def forget_adapter(self, adapter_id: str, keep_version: int | None = None) -> None:
        """Drop routers built on a version of `adapter_id` other than `keep_version` (any, when None)."""
        self._drop(lambda key: any(a == adapter_id and v != keep_version for a, v in key[2]))

    def forget_fusion(self, fusion_id: str) -> None:
        self._drop(lambda key: key[0] == fusion_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._routers)

    def _drop(self, stale: Callable[[tuple], bool]) -> None:
        with self._lock:
            self._forgets += 1
            self._routers = {key: router for key, router in self._routers.items() if not stale(key)}
