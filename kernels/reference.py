"""Plain PyTorch versions of the LoRA ops: the test oracle and the CPU serving path.

Same contract as the Triton kernels (see `triton_ops`): `shrink` returns the scaled
low-rank activations `v [num_active, K, n_slices, max_rank]` (float32, zero past each
rank), `expand` adds `v @ B^T` into y. Work is one matmul pair per (group, slot, slice),
cut to that slot's own rank, on the group's gathered rows; arithmetic is float32.
"""

from __future__ import annotations

import torch

from .metadata import LoRABatch
from .pool import LoRAPool


def shrink(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> torch.Tensor:
    """v[p, k, s, :r] = w_k * scale[s, slot_k] * x[token_index[p]] @ A[slot_k, slice s, :r]^T."""
    r_max = pool.max_rank
    v = torch.zeros(batch.num_active, batch.slots_per_row, pool.n_slices, r_max, dtype=torch.float32, device=x.device)
    if batch.num_active == 0:
        return v
    ranks, scales = pool.ranks.tolist(), pool.scales.tolist()
    rows = batch.token_index.long()
    for g, pairs in enumerate(batch.groups):
        lo, hi = batch.group_bounds[g], batch.group_bounds[g + 1]
        xg = x[rows[lo:hi]].float()
        for k, (slot, weight) in enumerate(pairs):
            for s in range(pool.n_slices):
                r = ranks[s][slot]
                if r:
                    a = pool.a[slot, s * r_max : s * r_max + r].float()
                    v[lo:hi, k, s, :r] = torch.mm(xg, a.t()).mul_(weight * scales[s][slot])
    return v


def expand(y: torch.Tensor, v: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y[token_index[p], slice s] += sum_k v[p, k, s, :r] @ B[slot_k, slice s, :r]^T, in place."""
    if batch.num_active == 0:
        return
    ranks = pool.ranks.tolist()
    offsets = [0]
    for width in pool.out_features:
        offsets.append(offsets[-1] + width)
    delta = torch.zeros(batch.num_active, pool.total_out, dtype=torch.float32, device=y.device)
    for g, pairs in enumerate(batch.groups):
        lo, hi = batch.group_bounds[g], batch.group_bounds[g + 1]
        for k, (slot, _) in enumerate(pairs):
            for s in range(pool.n_slices):
                r = ranks[s][slot]
                if r:
                    b = pool.b[slot, offsets[s] : offsets[s + 1], :r].float()
                    delta[lo:hi, offsets[s] : offsets[s + 1]].addmm_(v[lo:hi, k, s, :r], b.t())
    rows = batch.token_index.long()
    # Add in float32 and round once, as the kernel does.
    y[rows] = (y[rows].float() + delta).to(y.dtype)


def add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y += the LoRA delta of every token (shrink then expand)."""
    expand(y, shrink(x, pool, batch), pool, batch)
