"""Per-step segment metadata: which adapter slots (and weights) each token uses.

Built once per engine step by `make_lora_batch` and read by every LoRA layer of that
step, so all index work happens here and the per-layer calls only launch kernels.

Layout. Segments that name the same (slot, weight) list are merged into one *group*, and
the rows of all tokens of a group are listed contiguously in `token_index`. The kernels
then walk groups, not segments: an adapter's weights are read once per block of its
tokens however the engine interleaved its requests, which is what makes decode batches
(one token per request) bandwidth-efficient. Tokens whose segment names no slot are left
out of `token_index` altogether and cost nothing.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SlotSpec = int | Sequence[tuple[int, float]]
"""What one segment uses: a slot id (-1 = bare base model), or a list of (slot, weight) pairs."""

Pairs = tuple[tuple[int, float], ...]


@dataclass(frozen=True, eq=False)
class LoRABatch:
    """Segment metadata for one flattened token batch (see module docstring).

    The tensors live on the device of the step; the Python mirrors (`groups`,
    `group_bounds`) let the CPU path and the launch code size things without a device sync.
    """

    num_tokens: int
    """Rows the batch refers to: x and y need at least this many (tokens with no adapter count)."""
    token_index: torch.Tensor
    """int32 [num_active]: rows of x/y, group by group."""
    group_starts: torch.Tensor
    """int32 [num_groups + 1]: group g owns token_index[group_starts[g]:group_starts[g+1]]."""
    group_slots: torch.Tensor
    """int32 [num_groups, slots_per_row]: slot ids of each group, padded with -1."""
    group_weights: torch.Tensor
    """float32 [num_groups, slots_per_row]: weight of each slot (0 on padding)."""
    groups: tuple[Pairs, ...]
    """Python mirror of group_slots/group_weights, without padding."""
    group_bounds: tuple[int, ...]
    """Python mirror of group_starts."""
    max_group_len: int
    """Tokens in the largest group: sizes the kernel grid and picks decode or prefill tiles."""
    slots_per_row: int
    """K, the most (slot, weight) pairs any group has; 1 when no row mixes adapters."""

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_active(self) -> int:
        return self.group_bounds[-1]

    @property
    def device(self) -> torch.device:
        return self.token_index.device


def _pairs(spec: SlotSpec) -> Pairs:
    """Canonical pair list of one segment: slot -1 entries dropped, sorted by slot."""
    if not isinstance(spec, Sequence):  # a lone slot id: int, numpy or 0-d tensor integer
        slot = operator.index(spec)
        return () if slot < 0 else ((slot, 1.0),)
    merged: dict[int, float] = {}
    for slot, weight in spec:
        slot = operator.index(slot)
        if slot >= 0:
            merged[slot] = merged.get(slot, 0.0) + float(weight)
    return tuple(sorted(merged.items()))


def make_lora_batch(
    segment_lengths: Sequence[int],
    segment_slots: Sequence[SlotSpec],
    *,
    device: torch.device | str = "cpu",
    token_order: Sequence[int] | torch.Tensor | None = None,
) -> LoRABatch:
    """Build the metadata for a batch cut into segments.

    Segment i covers the next `segment_lengths[i]` tokens and uses `segment_slots[i]`: a
    slot id, -1 for none, or a list of (slot, weight) pairs whose deltas are summed with
    those weights (adapter fusion). Segments may be empty.

    Tokens are taken in row order of x unless `token_order` is given: then segment i covers
    rows `token_order[start_i : start_i + length_i]` (any order, each row at most once;
    rows not listed get no delta).
    """
    if len(segment_lengths) != len(segment_slots):
        raise ValueError(f"{len(segment_lengths)} segment lengths but {len(segment_slots)} slot specs")
    lengths = [int(n) for n in segment_lengths]
    if any(n < 0 for n in lengths):
        raise ValueError("segment lengths must be >= 0")
    starts = list(itertools.accumulate(lengths, initial=0))
    total = starts[-1]
    if token_order is None:
        rows: Sequence[int] = range(total)
        num_tokens = total
    else:
        rows = torch.as_tensor(token_order).flatten().tolist()
        if len(rows) != total:
            raise ValueError(f"token_order must list {total} rows, one per segment token")
        if total and (min(rows) < 0 or len(set(rows)) != total):
            raise ValueError("token_order must hold distinct non-negative row indices")
        num_tokens = max(rows, default=-1) + 1

    # Plain Python on purpose: these lists hold at most a few thousand entries, and small
    # torch CPU ops (repeat_interleave, ...) cost milliseconds under thread contention.
    members: dict[Pairs, list[int]] = {}  # group -> its segments, in order
    for i, spec in enumerate(segment_slots):
        pairs = _pairs(spec)
        if pairs and lengths[i]:
            members.setdefault(pairs, []).append(i)
    groups = tuple(members)
    token_index: list[int] = []
    bounds = [0]
    for segs in members.values():
        for i in segs:
            token_index.extend(rows[starts[i] : starts[i + 1]])
        bounds.append(len(token_index))

    k = max((len(p) for p in groups), default=1)
    padded = [pairs + ((-1, 0.0),) * (k - len(pairs)) for pairs in groups]
    n_tok, n_grp = len(token_index), len(groups)
    # One host-to-device copy for everything: the weights ride along bit-cast to int32.
    ints = torch.tensor(token_index + bounds + [s for p in padded for s, _ in p], dtype=torch.int32)
    floats = torch.tensor([w for p in padded for _, w in p], dtype=torch.float32)
    packed = torch.cat([ints, floats.view(torch.int32)]).to(device)
    token_index_d, starts_d, slots_d, weights_d = packed.split([n_tok, n_grp + 1, n_grp * k, n_grp * k])
    return LoRABatch(
        num_tokens=num_tokens,
        token_index=token_index_d,
        group_starts=starts_d,
        group_slots=slots_d.view(n_grp, k),
        group_weights=weights_d.view(torch.float32).view(n_grp, k),
        groups=groups,
        group_bounds=tuple(bounds),
        max_group_len=max((hi - lo for lo, hi in itertools.pairwise(bounds)), default=0),
        slots_per_row=k,
    )


def make_row_lora_batch(row_slots: torch.Tensor, slots: Sequence[int]) -> LoRABatch:
    """A batch of R rows, each its own group with one slot at weight 1 (-1: none), for a step of fixed shape.

    `row_slots` (int32 [R], on the step's device) becomes `group_slots` itself, not a copy,
    and must hold `slots` now; `slots` fills the Python mirrors the PyTorch path reads. The
    kernels' launches for such a batch depend on R alone and they read the slots from the
    device, so a step captured as a CUDA graph replays with whatever `row_slots` holds then.
    Unlike `make_lora_batch`, rows are not merged by adapter and rows with no adapter stay in.
    """
    rows = len(slots)
    if row_slots.dtype != torch.int32 or tuple(row_slots.shape) != (rows,):
        raise ValueError(f"row_slots must be int32 [{rows}]")
    positions = torch.arange(rows + 1, dtype=torch.int32, device=row_slots.device)
    return LoRABatch(
        num_tokens=rows,
        token_index=positions[:rows],
        group_starts=positions,
        group_slots=row_slots.view(rows, 1),
        group_weights=torch.ones(rows, 1, device=row_slots.device),
        groups=tuple(((s, 1.0),) if s >= 0 else () for s in slots),
        group_bounds=tuple(range(rows + 1)),
        max_group_len=1 if rows else 0,
        slots_per_row=1,
    )
