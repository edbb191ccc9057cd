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
    if isinstance(spec, int):
        return () if spec < 0 else ((spec, 1.0),)
    merged: dict[int, float] = {}
    for slot, weight in spec:
        slot = int(slot)
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
    total = sum(lengths)
    if token_order is None:
        rows = torch.arange(total, dtype=torch.int32)
        num_tokens = total
    else:
        rows = torch.as_tensor(token_order, dtype=torch.int64).cpu()
        if rows.ndim != 1 or rows.numel() != total:
            raise ValueError(f"token_order must list {total} rows, one per segment token")
        if total and (rows.min() < 0 or rows.unique().numel() != total):
            raise ValueError("token_order must hold distinct non-negative row indices")
        num_tokens = int(rows.max()) + 1 if total else 0
        rows = rows.to(torch.int32)

    group_of: dict[Pairs, int] = {}
    seg_group: list[int] = []
    for spec, length in zip(segment_slots, lengths, strict=True):
        pairs = _pairs(spec)
        if not pairs or length == 0:
            seg_group.append(-1)
            continue
        seg_group.append(group_of.setdefault(pairs, len(group_of)))
    groups = tuple(group_of)

    # Gather each group's token rows with tensor ops (no per-token Python loop): sort the
    # segments by group, then expand each kept segment into the range of rows it covers.
    seg_len = torch.tensor(lengths, dtype=torch.int64)
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    seg_group_t = torch.tensor(seg_group, dtype=torch.int64)
    kept = torch.nonzero(seg_group_t >= 0).flatten()
    order = kept[torch.argsort(seg_group_t[kept], stable=True)]
    lens = seg_len[order]
    first = torch.repeat_interleave(seg_start[order] - (torch.cumsum(lens, 0) - lens), lens)
    positions = first + torch.arange(int(lens.sum()), dtype=torch.int64)
    token_index = rows[positions]

    group_len = torch.zeros(len(groups), dtype=torch.int64).index_add_(0, seg_group_t[kept], seg_len[kept])
    starts = torch.zeros(len(groups) + 1, dtype=torch.int64)
    torch.cumsum(group_len, 0, out=starts[1:])

    k = max((len(p) for p in groups), default=1)
    slots = torch.full((len(groups), k), -1, dtype=torch.int32)
    weights = torch.zeros((len(groups), k), dtype=torch.float32)
    for g, pairs in enumerate(groups):
        slots[g, : len(pairs)] = torch.tensor([s for s, _ in pairs], dtype=torch.int32)
        weights[g, : len(pairs)] = torch.tensor([w for _, w in pairs], dtype=torch.float32)

    # One host-to-device copy for everything: the weights ride along bit-cast to int32.
    packed = torch.cat(
        [token_index, starts.to(torch.int32), slots.flatten(), weights.flatten().view(torch.int32)]
    ).to(device)
    n_tok, n_grp = token_index.numel(), len(groups)
    token_index_d, starts_d, slots_d, weights_d = packed.split([n_tok, n_grp + 1, n_grp * k, n_grp * k])
    return LoRABatch(
        num_tokens=num_tokens,
        token_index=token_index_d,
        group_starts=starts_d,
        group_slots=slots_d.view(n_grp, k),
        group_weights=weights_d.view(torch.float32).view(n_grp, k),
        groups=groups,
        group_bounds=tuple(starts.tolist()),
        max_group_len=int(group_len.max()) if n_grp else 0,
        slots_per_row=k,
    )
