"""The LoRA ops in plain PyTorch: the CPU serving path (and any device without Triton).

Same contract as the Triton kernels (see `triton_ops`), computed in float32. Where the
kernels tile, this path loops: for every (group, pair, slice) with a rank it multiplies the
group's token rows by that slice's A, then by its B, each read only up to the rank.

On a CPU a product of a few rows costs microseconds whatever its size, so what decides the
cost is the number of ops per item. Each slot's weights are therefore kept once per load as
float32, transposed, cut to each slice's rank (`_Slot`), and an item is one shrink product
for all of the slot's slices plus one expand product per slice, on ready tensors. Batching
the items into a few large matmuls was measured slower: it first gathers every adapter's
weights into one tensor, and in a decode step those weights are most of the bytes moved.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from .metadata import LoRABatch
from .pool import LoRAPool


@dataclass(frozen=True)
class _Slice:
    """One slice of a slot with a rank, as the expand reads it."""

    index: int
    """The slice's position in the pool (q, k, v of a fused q/k/v pool: 0, 1, 2)."""
    columns: slice
    """The columns of y it writes."""
    ranks: slice
    """Its columns of the slot's shrink output (`_Slot.a_t`'s columns)."""
    scale: float
    b_t: torch.Tensor
    """float32 [rank, out_features of the slice]: B[slot, slice, :, :rank] transposed."""

    @property
    def rank(self) -> int:
        return self.b_t.shape[0]


@dataclass(frozen=True)
class _Slot:
    """One slot's weights as the products read them: float32, transposed, cut to each rank."""

    a_t: torch.Tensor
    """float32 [in_features, sum of the slices' ranks]: every slice's A, so one product shrinks x for all."""
    slices: tuple[_Slice, ...]
    """The slices with a rank; none for an empty or cleared slot."""


# Per pool, per slot: (the slot's version when it was read, what was read). An entry lives as
# long as its pool, at most one per slot: float32 copies of each slot's ranks, at most twice
# the pool's own size.
_slots: weakref.WeakKeyDictionary[LoRAPool, dict[int, tuple[int, _Slot]]] = weakref.WeakKeyDictionary()


def _slot(pool: LoRAPool, slot: int) -> _Slot:
    """`slot`'s weights as read at its last load."""
    held = _slots.setdefault(pool, {})
    version = pool.versions[slot]
    entry = held.get(slot)
    if entry is None or entry[0] != version:
        ranks, scales = pool.ranks[:, slot].tolist(), pool.scales[:, slot].tolist()
        offsets = pool.out_offsets.tolist()
        used = [(s, r) for s, r in enumerate(ranks) if r]
        starts = list(itertools.accumulate((r for _, r in used), initial=0))
        a = [pool.a[slot, s * pool.max_rank : s * pool.max_rank + r] for s, r in used]
        slices = tuple(
            _Slice(
                index=s,
                columns=slice(offsets[s], offsets[s + 1]),
                ranks=slice(starts[i], starts[i + 1]),
                scale=scales[s],
                b_t=pool.b[slot, offsets[s] : offsets[s + 1], :r].float().t(),
            )
            for i, (s, r) in enumerate(used)
        )
        a_t = torch.cat(a).float().t() if a else pool.a.new_empty(pool.in_features, 0, dtype=torch.float32)
        entry = held[slot] = (version, _Slot(a_t, slices))
    return entry[1]


_Item = tuple[int, int, int, _Slot, float]
"""(first row, end row, k, slot, pair weight) of one (group, pair) whose slot has a rank."""


def _items(pool: LoRAPool, batch: LoRABatch) -> list[_Item]:
    used = [
        (g, k, held)
        for g, pairs in enumerate(batch.groups)
        for k, (slot, _) in enumerate(pairs)
        if (held := _slot(pool, slot)).slices
    ]
    if not used:
        return []  # the common case for modules no resident adapter targets
    # Weights from the tensor, not the `groups` mirror: a batch copy may swap them.
    weights, bounds = batch.group_weights.tolist(), batch.group_bounds
    return [(bounds[g], bounds[g + 1], k, held, weights[g][k]) for g, k, held in used]


def _active_x(x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """The rows of x that use an adapter, group by group, in float32."""
    return x.index_select(0, batch.token_index).float()


def _add_rows(y: torch.Tensor, delta: torch.Tensor, batch: LoRABatch) -> None:
    """y[token_index[p]] += delta[p], rounding once."""
    rows = batch.token_index.long()
    y.index_copy_(0, rows, y.index_select(0, rows).add_(delta))


def shrink(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> torch.Tensor:
    """v[p, k, s, :r] = w_k * scale[s, slot_k] * x[token_index[p]] @ A[slot_k, slice s, :r]^T; zero past r."""
    v = torch.zeros(batch.num_active, batch.slots_per_row, pool.n_slices, pool.max_rank, device=x.device)
    items = _items(pool, batch)
    if items:
        xa = _active_x(x, batch)
        for lo, hi, k, held, weight in items:
            h = torch.mm(xa[lo:hi], held.a_t)
            for part in held.slices:
                v[lo:hi, k, part.index, : part.rank] = h[:, part.ranks] * (weight * part.scale)
    return v


def expand(y: torch.Tensor, v: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y[token_index[p], slice s] += sum_k v[p, k, s, :r] @ B[slot_k, slice s, :r]^T, in place."""
    items = _items(pool, batch)
    if not items:
        return
    delta = torch.zeros(batch.num_active, pool.total_out, device=y.device)
    for lo, hi, k, held, _ in items:
        rows = delta[lo:hi]
        for part in held.slices:  # v past the rank is undefined
            rows[:, part.columns].addmm_(v[lo:hi, k, part.index, : part.rank], part.b_t)
    _add_rows(y, delta, batch)


def add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y += the LoRA delta of every token: shrink then expand per item, without v's layout in between."""
    items = _items(pool, batch)
    if not items:
        return
    xa = _active_x(x, batch)
    delta = torch.zeros(batch.num_active, pool.total_out, device=y.device)
    for lo, hi, _, held, weight in items:
        h, rows = torch.mm(xa[lo:hi], held.a_t), delta[lo:hi]
        for part in held.slices:
            rows[:, part.columns].addmm_(h[:, part.ranks], part.b_t, alpha=weight * part.scale)
    _add_rows(y, delta, batch)
