"""LoRA in the engine: every target linear layer adds, per token, the deltas of its adapters.

Target modules that read the same input are fused: in each decoder layer, q/k/v is one unit and
gate/up another (o and down stay alone), so a layer makes 4 LoRA calls instead of 7, and each
fused call shrinks x once for all its slices (see `plait.kernels`, "slices"). A unit owns a
device pool of adapter weights indexed by slot, with one slice per module. The model still
calls each module on its own (transformers' attention calls q_proj, then k_proj, then v_proj
on the same hidden states): the first call of a unit with a new input computes every slice's
base output and delta at once, and the others take their columns of it.

Which slots a token uses arrives once per step as a `LoRABatch` (segment metadata) that every
unit reads, so a batch mixing many adapters, weighted combinations of them and the bare base
model is still one forward pass, with one kernel call per unit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from plait.kernels import LoRABatch, LoRAPool, SlotSpec, add_lora, lora_expand, lora_shrink, make_lora_batch
from plait.server.engine.routing import Router

# Modules of one decoder layer that read the same input, fused into one LoRA call.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoRAStep:
    """The current step's segment metadata, shared by every unit of one model."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.routes: list[RoutedRows] = []


class RoutedRows:
    """The tokens one router weighs this step: rows of x that use the same routed adapters.

    Their segments name every member's slot with weight 1; each unit then scales the members'
    low-rank activations per token and slice by the router's weights for that slice's module
    before expanding, so routing needs no kernel of its own. The weights are summed per token
    for the report.
    """

    def __init__(self, router: Router, rows: torch.Tensor, positions: torch.Tensor, members: torch.Tensor):
        self.router = router
        self.rows = rows  # rows of x
        self.positions = positions  # the same tokens' rows of the shrink output (token_index order)
        self.members = members  # each member's index among its group's (slot, weight) pairs
        self.totals = torch.zeros(len(rows), len(members), device=rows.device)

    def apply(self, paths: Sequence[str], x: torch.Tensor, v: torch.Tensor) -> None:
        for s, path in enumerate(paths):
            weights = self.router.weights(path, x[self.rows])
            if weights is None:  # no member adapts this module
                continue
            v[self.positions[:, None], self.members, s] *= weights[:, :, None]
            self.totals += weights


class LoRAUnit(nn.Module):
    """One or several base projections of the same input, with their LoRA deltas (one slice each)."""

    def __init__(self, bases: Sequence[nn.Module], paths: Sequence[str], pool: LoRAPool, step: LoRAStep):
        super().__init__()
        self.bases = nn.ModuleList(bases)
        self.paths = tuple(paths)  # the base modules' paths, which routers key their gates by
        self.pool = pool
        self.step = step
        self.columns = list(itertools.pairwise(itertools.accumulate(pool.out_features, initial=0)))
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Every slice's base output plus delta for input `x`, side by side ([..., total_out])."""
        if x is self._input:
            return self._output
        outputs = [base(x) for base in self.bases]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        batch = self.step.batch
        if batch is not None and batch.num_groups:
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            if self.step.routes:
                v = lora_shrink(x2, self.pool, batch)
                for route in self.step.routes:
                    route.apply(self.paths, x2, v)
                lora_expand(y2, v, self.pool, batch)
            else:
                add_lora(y2, x2, self.pool, batch)
        # Kept for the unit's other modules, which the model calls next with the same x; holding
        # x also keeps its identity from being reused while the entry lives.
        self._input, self._output = (x, y) if len(self.bases) > 1 else (None, None)
        return y

    def load(self, slot: int, modules: dict) -> None:
        """Put an adapter's weights for these modules (path -> weights with a, b, scale) into `slot`;
        a module it does not target contributes nothing for that slot."""
        weights = [modules.get(path) for path in self.paths]
        if all(w is None for w in weights):
            self.pool.clear(slot)
            return
        device = self.pool.a.device
        self.pool.load(
            slot,
            [None if w is None else w.a.to(device) for w in weights],
            [None if w is None else w.b.to(device) for w in weights],
            [0.0 if w is None else w.scale for w in weights],
        )


class LoRAProjection(nn.Module):
    """Stands in the model for one base projection: its columns of its unit's output."""

    def __init__(self, unit: LoRAUnit, index: int):
        super().__init__()
        self.unit = unit
        self.index = index
        self.in_features = unit.pool.in_features
        self.out_features = unit.pool.out_features[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit.output(x)
        if len(self.unit.columns) == 1:
            return y
        lo, hi = self.unit.columns[self.index]
        return y[..., lo:hi]


class LoRALayers:
    """The model's LoRA units and their slot pools."""

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
        self.units: list[LoRAUnit] = []
        for paths in _units(targets):
            parents = [model.get_submodule(p.rpartition(".")[0]) for p in paths]
            names = [p.rpartition(".")[2] for p in paths]
            in_features = targets[paths[0]][0]
            outs = [targets[p][1] for p in paths]
            pool = LoRAPool.create(num_slots, in_features, outs, max_rank, dtype=dtype, device=device)
            unit = LoRAUnit(
                [getattr(parent, name) for parent, name in zip(parents, names, strict=True)], paths, pool, self.step
            )
            for index, (parent, name) in enumerate(zip(parents, names, strict=True)):
                setattr(parent, name, LoRAProjection(unit, index))
            self.units.append(unit)

    def load(self, slot: int, modules: dict) -> None:
        """Put an adapter's weights (module path -> weights with a, b, scale) into `slot`;
        every module it does not target contributes nothing for that slot."""
        for unit in self.units:
            unit.load(slot, modules)

    def use_batch(self, batch: LoRABatch | None) -> None:
        """Segment metadata, built by the caller, for the next forward pass; no routers."""
        self.step.batch = batch
        self.step.routes = []

    def set_segments(
        self, lengths: Sequence[int], slots: Sequence[SlotSpec], routes: Sequence[tuple[Router, list[int]]] = ()
    ) -> list[RoutedRows]:
        """Segment metadata for the next forward pass (None when no token uses an adapter).

        `routes` lists, per router, its segments' indices; those segments must name the
        router's member slots, in member order, each with weight 1.
        """
        uses_lora = any(s != -1 for s in slots)
        batch = make_lora_batch(lengths, slots, device=self.device) if uses_lora else None
        self.use_batch(batch)
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


def _units(targets: dict[str, tuple[int, int]]) -> list[tuple[str, ...]]:
    """The target paths grouped into units: the fused groups present whole, each other target alone."""
    units, fused = [], set()
    for path in targets:
        parent, _, name = path.rpartition(".")
        for group in FUSED:
            if name != group[0]:
                continue
            members = tuple(f"{parent}.{n}" for n in group)
            if all(m in targets for m in members) and len({targets[m][0] for m in members}) == 1:
                units.append(members)
                fused.update(members)
    return units + [(path,) for path in targets if path not in fused]
