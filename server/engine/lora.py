"""LoRA in the engine: every target linear layer adds, per token, the deltas of its adapters.

Each target module of the base (q/k/v/o and gate/up/down in every decoder layer) is wrapped
in a `LoRALinear` that owns a device pool of adapter weights indexed by slot. Which slots a
token uses arrives once per step as a `LoRABatch` (segment metadata) that every layer reads,
so a batch mixing many adapters, weighted combinations of them and the bare base model is
still one forward pass, with one kernel call per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from plait.kernels import LoRABatch, LoRAPool, SlotSpec, add_lora, lora_expand, lora_shrink, make_lora_batch
from plait.server.engine.routing import Router


class LoRAStep:
    """The current step's segment metadata, shared by every `LoRALinear` of one model."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.routes: list[RoutedRows] = []


class RoutedRows:
    """The tokens one router weighs this step: rows of x that use the same routed adapters.

    Their segments name every member's slot with weight 1; each layer then scales the
    members' low-rank activations per token by the router's weights before expanding, so
    routing needs no kernel of its own. The weights are summed per token for the report.
    """

    def __init__(self, router: Router, rows: torch.Tensor, positions: torch.Tensor, members: torch.Tensor):
        self.router = router
        self.rows = rows  # rows of x
        self.positions = positions  # the same tokens' rows of the shrink output (token_index order)
        self.members = members  # each member's index among its group's (slot, weight) pairs
        self.totals = torch.zeros(len(rows), len(members), device=rows.device)

    def apply(self, path: str, x: torch.Tensor, v: torch.Tensor) -> None:
        weights = self.router.weights(path, x[self.rows])
        if weights is None:  # no member adapts this layer
            return
        v[self.positions[:, None], self.members] *= weights[:, :, None, None]
        self.totals += weights


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, pool: LoRAPool, step: LoRAStep, path: str):
        super().__init__()
        self.base = base
        self.pool = pool
        self.step = step
        self.path = path  # the base module's path, which routers key their gates by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.step.batch
        if batch is not None and batch.num_groups:
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            if self.step.routes:
                v = lora_shrink(x2, self.pool, batch)
                for route in self.step.routes:
                    route.apply(self.path, x2, v)
                lora_expand(y2, v, self.pool, batch)
            else:
                add_lora(y2, x2, self.pool, batch)
        return y


class LoRALayers:
    """The model's LoRA-wrapped modules and their slot pools."""

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, tuple[int, int]],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.step = LoRAStep()
        self.device = device
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.modules: dict[str, LoRALinear] = {}
        for path, (in_features, out_features) in targets.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            pool = LoRAPool.create(num_slots, in_features, out_features, max_rank, dtype=dtype, device=device)
            wrapped = LoRALinear(getattr(parent, name), pool, self.step, path)
            setattr(parent, name, wrapped)
            self.modules[path] = wrapped

    def load(self, slot: int, modules: dict) -> None:
        """Put an adapter's weights (module path -> weights with a, b, scale) into `slot`;
        every module it does not target contributes nothing for that slot."""
        for path, layer in self.modules.items():
            w = modules.get(path)
            if w is None:
                layer.pool.clear(slot)
            else:
                layer.pool.load(slot, [w.a.to(self.device)], [w.b.to(self.device)], [w.scale])

    def set_segments(
        self, lengths: Sequence[int], slots: Sequence[SlotSpec], routes: Sequence[tuple[Router, list[int]]] = ()
    ) -> list[RoutedRows]:
        """Segment metadata for the next forward pass (None when no token uses an adapter).

        `routes` lists, per router, its segments' indices; those segments must name the
        router's member slots, in member order, each with weight 1.
        """
        uses_lora = any(s != -1 for s in slots)
        batch = self.step.batch = make_lora_batch(lengths, slots, device=self.device) if uses_lora else None
        self.step.routes = []
        if not routes:
            return []
        position_of = torch.full((batch.num_tokens,), -1, dtype=torch.long, device=self.device)
        position_of[batch.token_index.long()] = torch.arange(batch.num_active, device=self.device)
        starts = list(itertools.accumulate(lengths, initial=0))
        for router, segments in routes:
            rows = torch.tensor([r for i in segments for r in range(starts[i], starts[i + 1])], device=self.device)
            member_slots = [slot for slot, _ in slots[segments[0]]]
            order = sorted(member_slots)  # a group lists its (slot, weight) pairs by slot
            members = torch.tensor([order.index(slot) for slot in member_slots], device=self.device)
            self.step.routes.append(RoutedRows(router, rows, position_of[rows], members))
        return self.step.routes
