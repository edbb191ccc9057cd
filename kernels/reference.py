"""The LoRA ops in plain PyTorch: the CPU serving path (and any device without Triton).

Same contract as the Triton kernels (see `triton_ops`), computed in float32. Where the
kernels tile, this path loops: for every (group, pair, slice) with a rank it multiplies the
group's token rows by A[slot, slice, :r], then by B[slot, slice, :, :r], each read from the
pool once and only up to the rank. On a CPU that is as fast as batching the work into a
few large matmuls (measured: the batched version this replaced took as long per decode
step and three times longer on prefills), because batching first gathers every adapter's
weights into one tensor, and in a decode step those weights are most of the bytes moved.
"""

from __future__ import annotations

import torch

from .metadata import LoRABatch
from .pool import LoRAPool

_Item = tuple[int, int, int, int, int, int, float]
"""(first row, end row, k, slot, slice, rank, weight * scale) of one (group, pair, slice) with a rank."""


def _items(pool: LoRAPool, batch: LoRABatch) -> list[_Item]:
    ranks = pool.ranks.tolist()
    used = [(g, k, slot) for g, pairs in enumerate(batch.groups) for k, (slot, _) in enumerate(pairs)]
    if not any(row[slot] for row in ranks for _, _, slot in used):
        return []  # the common case for modules no resident adapter targets
    # Weights from the tensor, not the `groups` mirror: a batch copy may swap them.
    scales, weights, bounds = pool.scales.tolist(), batch.group_weights.tolist(), batch.group_bounds
    return [
        (bounds[g], bounds[g + 1], k, slot, s, ranks[s][slot], weights[g][k] * scales[s][slot])
        for g, k, slot in used
        for s in range(pool.n_slices)
        if ranks[s][slot]
    ]


def _a(pool: LoRAPool, slot: int, s: int, r: int) -> torch.Tensor:
    """A[slot, slice s, :r] as float32 [r, in] (a view when the pool is float32)."""
    lo = s * pool.max_rank
    return pool.a[slot, lo : lo + r].float()


def _b(pool: LoRAPool, slot: int, s: int, r: int) -> tuple[int, int, torch.Tensor]:
    """The columns of y slice s writes, and B[slot, slice s, :, :r] as float32 [out_s, r]."""
    lo = sum(pool.out_features[:s])
    hi = lo + pool.out_features[s]
    return lo, hi, pool.b[slot, lo:hi, :r].float()


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
        for lo, hi, k, slot, s, r, coef in items:
            v[lo:hi, k, s, :r] = torch.mm(xa[lo:hi], _a(pool, slot, s, r).t()).mul_(coef)
    return v


def expand(y: torch.Tensor, v: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y[token_index[p], slice s] += sum_k v[p, k, s, :r] @ B[slot_k, slice s, :r]^T, in place."""
    items = _items(pool, batch)
    if not items:
        return
    delta = torch.zeros(batch.num_active, pool.total_out, device=y.device)
    for lo, hi, k, slot, s, r, _ in items:
        c0, c1, b = _b(pool, slot, s, r)
        delta[lo:hi, c0:c1].addmm_(v[lo:hi, k, s, :r], b.t())  # only v below the rank is defined
    _add_rows(y, delta, batch)


def add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y += the LoRA delta of every token: shrink then expand per item, without v's layout in between."""
    items = _items(pool, batch)
    if not items:
        return
    xa = _active_x(x, batch)
    delta = torch.zeros(batch.num_active, pool.total_out, device=y.device)
    for lo, hi, _, slot, s, r, coef in items:
        c0, c1, b = _b(pool, slot, s, r)
        delta[lo:hi, c0:c1].addmm_(torch.mm(xa[lo:hi], _a(pool, slot, s, r).t()), b.t(), alpha=coef)
    _add_rows(y, delta, batch)
