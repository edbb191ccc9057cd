"""The LoRA ops in plain PyTorch: the CPU serving path (and any device without Triton).

Same contract as the Triton kernels (see `triton_ops`): `shrink` returns the scaled
low-rank activations `v [num_active, K, n_slices, max_rank]` (float32, zero past each
rank), `expand` adds `v @ B^T` into y. Arithmetic is float32.

It runs the kernels' tiling as batched matmuls: a fixed dozen or so torch ops per call,
whatever the number of adapters. A *block* is what one program of the Triton shrink does:
a tile of up to `length` token rows of one group, one (slot, weight) pair, one slice, and
one block of `width` rank rows that starts below that slot's rank. Per call:

    x rows of every block      [blocks, length, in]      one gather
    A rows of every block      [blocks, width, in]       one gather (a view of the pool)
    v = x @ A^T * w * scale    [blocks, length, width]   one bmm
    B columns of every block   [blocks, out, width]      one gather (a strided view of the pool)
    d = v @ B^T                [blocks, length, out]     one bmm per slice
    delta[token] += d          one index_add_ (sums rank blocks and the K pairs of a row)
    y[rows] = round(y[rows] + delta)

The index tensors come from a `_Plan`, made on the first call of a step for a pool geometry
and the ranks of the batch's slots in that pool, and kept in `batch.derived`; a pool in which
no slot of the batch has a rank costs a `tolist`. The plan picks `length` and `width` with a
cost model (`_choose`): long tiles pad short groups, narrow rank blocks repeat x rows and
gather B in short runs, wide ones read past small ranks. What a block reads past its slot's
rank is zero in the pool (see `LoRAPool`), so it adds nothing. Pair weights are read from
`batch.group_weights` and scales from `pool.scales` at every call, never from the Python
mirrors, so either may be swapped for another tensor without a new plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch

from .metadata import LoRABatch
from .pool import LoRAPool

MAX_TILE_LEN = 64
"""Longest tile: one long prefill group must not pad every other group to its length."""
MIN_WIDTH = 16
"""Narrowest rank block (when max_rank allows)."""
ROW_COST, MAC_COST = 0.75, 0.05
"""Costs, relative to gathering one adapter weight element (which includes its bf16 -> fp32
conversion), of gathering one element of x or writing and summing one of the per-block
deltas (the rows a block reads and writes), and of one multiply-add. Measured on a CPU with
`bench/bench_lora_cpu.py --sweep`; only the ratios matter."""


@dataclass(frozen=True)
class _Step:
    """What every plan of a step shares."""

    token_index: list[int]
    active_rows: torch.Tensor  # int64 [num_active]: token_index, the rows of y that get a delta
    used_slots: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class _Plan:
    length: int
    """Token rows per tile (the last tile of a group is padded)."""
    width: int
    """Rank rows per block; divides the pool's max_rank."""
    x_rows: torch.Tensor
    """int64 [blocks * length]: row of x each block row reads (row 0 on padding; its result is dropped)."""
    a_blocks: torch.Tensor
    """int64 [blocks]: index into pool.a viewed as [num_slots * n_slices * max_rank / width, width, in]."""
    b_blocks: torch.Tensor
    """int64 [blocks]: index into `_b_view(pool, s, width)`, the B columns of each block."""
    pairs: torch.Tensor
    """int64 [blocks]: flat index of each block's (group, k) in group_weights."""
    scale_index: torch.Tensor
    """int64 [blocks]: flat index of each block's (slice, slot) in pool.scales."""
    dest: torch.Tensor
    """int64 [blocks * length]: position in token_index of each block row (num_active on padding)."""
    slices: tuple[tuple[int, int, int, int, int, torch.Tensor, torch.Tensor], ...]
    """Blocks are ordered by slice; per slice with blocks: (slice, first block, end block, first
    column of y, end column, its b_blocks, its dest)."""
    blocks: tuple[tuple[int, int, int, int, int, int], ...]
    """Python mirror, per block: (first position, rows, k, slice, rank block, rank); for lora_shrink/lora_expand."""
    v_shape: tuple[int, int, int, int]
    """(num_active, K, n_slices, max_rank): the layout of v in lora_shrink/lora_expand."""

    @property
    def num_blocks(self) -> int:
        return self.a_blocks.shape[0]

    @cached_property
    def v_rows(self) -> torch.Tensor:
        """int64 [blocks * length]: the row of v, viewed as [num_active * K * n_slices * max_rank / width, width],
        of every block row (one past the end on padding)."""
        num_active, k_max, n_slices, max_rank = self.v_shape
        per_rank = max_rank // self.width
        dump = num_active * k_max * n_slices * per_rank
        rows: list[int] = []
        for p0, n, k, s, c, _ in self.blocks:
            rows += [((p * k_max + k) * n_slices + s) * per_rank + c for p in range(p0, p0 + n)]
            rows += [dump] * (self.length - n)
        return torch.tensor(rows, dtype=torch.int64).to(self.dest.device)

    @cached_property
    def keep(self) -> torch.Tensor:
        """bool [blocks, 1, width]: which rank rows of each block lie below its slot's rank."""
        left = torch.tensor([r - c * self.width for *_, c, r in self.blocks], dtype=torch.int64)
        return (torch.arange(self.width) < left[:, None])[:, None, :].to(self.dest.device)


def _step(batch: LoRABatch) -> _Step:
    step = batch.derived.get("step")
    if step is None:
        token_index = batch.token_index.tolist()
        active_rows = torch.tensor(token_index, dtype=torch.int64).to(batch.device)
        used = tuple(sorted({slot for pairs in batch.groups for slot, _ in pairs}))
        step = batch.derived["step"] = _Step(token_index, active_rows, used)
    return step


def _plan_for(batch: LoRABatch, pool: LoRAPool) -> _Plan | None:
    """The plan of this batch for this pool's geometry and ranks; None when no slot of the batch has any rank here."""
    step = _step(batch)
    ranks = pool.ranks.tolist()
    key = (pool.a.shape, pool.out_features, tuple(tuple(row[s] for s in step.used_slots) for row in ranks))
    try:
        return batch.derived[key]
    except KeyError:
        plan = batch.derived[key] = _make_plan(batch, pool, step, ranks)
        return plan


def _make_plan(batch: LoRABatch, pool: LoRAPool, step: _Step, ranks: list[list[int]]) -> _Plan | None:
    bounds, k_max, n_slices, max_rank = batch.group_bounds, batch.slots_per_row, pool.n_slices, pool.max_rank
    if not any(ranks[s][slot] for s in range(n_slices) for slot in step.used_slots):
        return None
    sizes = [hi - lo for lo, hi in itertools.pairwise(bounds)]
    # (group size, rank) of every (group, pair, slice) with work
    work = [(sizes[g], ranks[s][slot]) for g, group in enumerate(batch.groups) for slot, _ in group
            for s in range(n_slices) if ranks[s][slot]]  # fmt: skip
    length, width = _choose(work, pool)

    per_rank = max_rank // width
    blocks_per_slot_b = pool.total_out * max_rank // width
    num_active = batch.num_active
    blocks, x_rows, a_blocks, b_blocks, pairs, scale_index, dest = [], [], [], [], [], [], []
    slice_bounds = [0]
    for s in range(n_slices):
        for g, group in enumerate(batch.groups):
            for lo in range(bounds[g], bounds[g + 1], length):
                n = min(length, bounds[g + 1] - lo)
                pad = length - n
                for k, (slot, _) in enumerate(group):
                    r = ranks[s][slot]
                    for c in range(-(-r // width)):
                        blocks.append((lo, n, k, s, c, r))
                        x_rows += step.token_index[lo : lo + n] + [0] * pad
                        dest += list(range(lo, lo + n)) + [num_active] * pad
                        a_blocks.append((slot * n_slices + s) * per_rank + c)
                        b_blocks.append(slot * blocks_per_slot_b + c)
                        pairs.append(g * k_max + k)
                        scale_index.append(s * pool.num_slots + slot)
        slice_bounds.append(len(blocks))
    nb, nr = len(blocks), len(x_rows)
    packed = torch.tensor(x_rows + dest + a_blocks + b_blocks + pairs + scale_index, dtype=torch.int64)
    x_rows_t, dest_t, a_t, b_t, pairs_t, scales_t = packed.to(batch.device).split([nr, nr, nb, nb, nb, nb])
    cols = list(itertools.accumulate(pool.out_features, initial=0))
    slices = tuple((s, lo, hi, cols[s], cols[s + 1], b_t[lo:hi], dest_t[lo * length : hi * length])
                   for s, (lo, hi) in enumerate(itertools.pairwise(slice_bounds)) if hi > lo)  # fmt: skip
    return _Plan(length, width, x_rows_t, a_t, b_t, pairs_t, scales_t, dest_t, slices, tuple(blocks),
                 (num_active, k_max, n_slices, max_rank))  # fmt: skip


def _choose(work: list[tuple[int, int]], pool: LoRAPool) -> tuple[int, int]:
    """Tile length and rank block width for (group size, rank) work items, by the cost model."""
    max_rank, top, longest = pool.max_rank, max(r for _, r in work), max(n for n, _ in work)
    # Narrower blocks gather B in runs too short to copy fast (B's rank axis is innermost).
    widths = [w for w in range(1, max_rank + 1) if max_rank % w == 0 and w >= min(MIN_WIDTH, max_rank)]
    widths = [w for w in widths if w < top] + [min(w for w in widths if w >= top)]
    lengths = {min(longest, MAX_TILE_LEN)} | {1 << i for i in range(MAX_TILE_LEN.bit_length()) if 1 << i < longest}
    fan = pool.in_features + pool.total_out / pool.n_slices  # weights per rank row, and x + delta per token row

    def cost(length: int, width: int) -> float:
        blocks = sum(-(-n // length) * -(-r // width) for n, r in work)
        return blocks * fan * (width + ROW_COST * length + MAC_COST * length * width)

    return min(itertools.product(sorted(lengths), widths), key=lambda lw: cost(*lw))


def _b_view(pool: LoRAPool, s: int, width: int) -> torch.Tensor:
    """pool.b as [blocks, out_s, width]: block slot * total_out * max_rank / width + c holds
    B[slot, slice s, :, c * width : (c + 1) * width]. The blocks overlap in memory (it is only read)."""
    b = pool.b if pool.b.is_contiguous() else pool.b.contiguous()
    total_out, max_rank = pool.total_out, pool.max_rank
    lo = sum(pool.out_features[:s])
    count = ((pool.num_slots - 1) * total_out * max_rank + max_rank) // width
    return b.as_strided((count, pool.out_features[s], width), (width, max_rank, 1), b.storage_offset() + lo * max_rank)


def _shrink_blocks(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch, plan: _Plan) -> torch.Tensor:
    """v of every block row, [blocks, length, width] float32: w * scale * x @ A_block^T."""
    n, width = plan.num_blocks, plan.width
    xb = x.index_select(0, plan.x_rows).float().view(n, plan.length, -1)
    a = pool.a.view(-1, width, pool.in_features).index_select(0, plan.a_blocks).float()
    v = torch.bmm(xb, a.transpose(1, 2))
    coef = batch.group_weights.take(plan.pairs).mul_(pool.scales.take(plan.scale_index))
    return v.mul_(coef.view(n, 1, 1))


def _expand_blocks(y: torch.Tensor, v: torch.Tensor, pool: LoRAPool, batch: LoRABatch, plan: _Plan) -> None:
    """y[row] += the sum over its blocks of v_block @ B_block^T, rounding once."""
    delta = torch.zeros(plan.v_shape[0] + 1, pool.total_out, dtype=torch.float32, device=v.device)
    for s, lo, hi, col0, col1, b_blocks, dest in plan.slices:
        b = _b_view(pool, s, plan.width).index_select(0, b_blocks).float()
        d = torch.bmm(v if hi - lo == plan.num_blocks else v[lo:hi], b.transpose(1, 2))  # [blocks, length, out_s]
        cols = delta if pool.n_slices == 1 else delta[:, col0:col1]
        cols.index_add_(0, dest, d.view(-1, col1 - col0))  # padding rows land in the last row
    rows = _step(batch).active_rows
    y.index_copy_(0, rows, y.index_select(0, rows).add_(delta[:-1]))  # a 16-bit add_ of fp32 rounds once


def shrink(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> torch.Tensor:
    """v[p, k, s, :r] = w_k * scale[s, slot_k] * x[token_index[p]] @ A[slot_k, slice s, :r]^T."""
    shape = (batch.num_active, batch.slots_per_row, pool.n_slices, pool.max_rank)
    plan = _plan_for(batch, pool) if batch.num_active else None
    if plan is None:
        return torch.zeros(shape, dtype=torch.float32, device=x.device)
    rows = shape[0] * shape[1] * shape[2] * shape[3] // plan.width
    v = torch.zeros(rows + 1, plan.width, dtype=torch.float32, device=x.device)
    v.index_copy_(0, plan.v_rows, _shrink_blocks(x, pool, batch, plan).view(-1, plan.width))  # padding: last row
    return v[:-1].view(shape)


def expand(y: torch.Tensor, v: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y[token_index[p], slice s] += sum_k v[p, k, s, :r] @ B[slot_k, slice s, :r]^T, in place."""
    plan = _plan_for(batch, pool) if batch.num_active else None
    if plan is None:
        return
    flat = v.reshape(-1, plan.width)
    vb = flat.index_select(0, plan.v_rows.clamp(max=flat.shape[0] - 1)).view(plan.num_blocks, plan.length, -1)
    # Only v below each slot's rank is defined (past it, it may even be NaN).
    _expand_blocks(y, torch.where(plan.keep, vb, 0.0), pool, batch, plan)


def add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """y += the LoRA delta of every token: shrink then expand, block by block, without v's layout in between."""
    plan = _plan_for(batch, pool) if batch.num_active else None
    if plan is not None:
        _expand_blocks(y, _shrink_blocks(x, pool, batch, plan), pool, batch, plan)
