"""Device pool of adapter weights for one LoRA target module, indexed by slot.

A fused module (q/k/v, or gate/up) is one pool with several *slices* that share the
input x: their A matrices are stacked along the rank axis and their B matrices along the
output axis, so one kernel launch covers every slice. A plain module is a pool of one
slice, and then `a` and `b` are exactly `[num_slots, max_rank, in]` and
`[num_slots, out, max_rank]`.

Rank and scale are per (slice, slot): PEFT's `rank_pattern`/`alpha_pattern` may give q and
v of one adapter different ranks, and an adapter that does not target a slice has rank 0
there. Neither backend reads a slot's weights past its rank in a slice, nor a slice at
rank 0 (untargeted, or a cleared slot), so what lies there is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LoRAPool:
    a: torch.Tensor
    """[num_slots, n_slices * max_rank, in_features]; slice s of slot i is rows s*max_rank + [0, rank)."""
    b: torch.Tensor
    """[num_slots, sum(out_features), max_rank]; slice s is rows out_offsets[s]:out_offsets[s+1]."""
    ranks: torch.Tensor
    """int32 [n_slices, num_slots]; 0 = no delta for that slice."""
    scales: torch.Tensor
    """float32 [n_slices, num_slots]; the adapter's scaling (alpha/r or alpha/sqrt(r))."""
    out_features: tuple[int, ...]
    """Output width of each slice; y has sum(out_features) columns, slices side by side."""
    out_offsets: torch.Tensor
    """int32 [n_slices + 1], on the device: column where each slice starts in y (and in b)."""
    versions: list[int]
    """Per slot, counts its `load`s and `clear`s: what a backend derives from a slot's weights
    (the PyTorch path's float32 copies) is valid while the count is unchanged. Weights change
    only through `load`."""

    @classmethod
    def create(
        cls,
        num_slots: int,
        in_features: int,
        out_features: int | Sequence[int],
        max_rank: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> LoRAPool:
        """An empty pool (every slot at rank 0) for one module, or one fused group of modules."""
        outs = (int(out_features),) if isinstance(out_features, int) else tuple(int(n) for n in out_features)
        if not outs or min(outs) <= 0 or num_slots <= 0 or in_features <= 0 or max_rank <= 0:
            raise ValueError("pool sizes must be positive")
        n = len(outs)
        offsets = [0]
        for width in outs:
            offsets.append(offsets[-1] + width)
        return cls(
            a=torch.zeros(num_slots, n * max_rank, in_features, dtype=dtype, device=device),
            b=torch.zeros(num_slots, offsets[-1], max_rank, dtype=dtype, device=device),
            ranks=torch.zeros(n, num_slots, dtype=torch.int32, device=device),
            scales=torch.zeros(n, num_slots, dtype=torch.float32, device=device),
            out_features=outs,
            out_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
            versions=[0] * num_slots,
        )

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def n_slices(self) -> int:
        return len(self.out_features)

    @property
    def max_rank(self) -> int:
        return self.b.shape[2]

    @property
    def in_features(self) -> int:
        return self.a.shape[2]

    @property
    def total_out(self) -> int:
        return self.b.shape[1]

    def load(
        self,
        slot: int,
        a: Sequence[torch.Tensor | None],
        b: Sequence[torch.Tensor | None],
        scales: Sequence[float],
    ) -> None:
        """Write one adapter into `slot`: per slice, A `[r, in]` and B `[out, r]` as PEFT stores
        them (None where the adapter does not target that slice) and its scale."""
        if not (len(a) == len(b) == len(scales) == self.n_slices):
            raise ValueError(f"expected {self.n_slices} slices of A, B and scale")
        ranks = []
        for s, (a_s, b_s) in enumerate(zip(a, b, strict=True)):
            if (a_s is None) != (b_s is None):
                raise ValueError(f"slice {s}: A and B must both be given or both be None")
            r = 0 if a_s is None else a_s.shape[0]
            if a_s is not None and (a_s.shape != (r, self.in_features) or b_s.shape != (self.out_features[s], r)):
                raise ValueError(
                    f"slice {s}: A {tuple(a_s.shape)} / B {tuple(b_s.shape)} do not fit "
                    f"in_features={self.in_features}, out_features={self.out_features[s]}"
                )
            if a_s is not None and not 0 < r <= self.max_rank:
                raise ValueError(f"slice {s}: rank {r} outside 1..{self.max_rank}")
            ranks.append(r)
        for s, r in enumerate(ranks):
            if r:
                lo, o0 = s * self.max_rank, sum(self.out_features[:s])
                self.a[slot, lo : lo + r].copy_(a[s])
                self.b[slot, o0 : o0 + self.out_features[s], :r].copy_(b[s])
        self.ranks[:, slot] = torch.tensor(ranks, dtype=torch.int32)
        self.scales[:, slot] = torch.tensor([float(x) for x in scales], dtype=torch.float32)
        self.versions[slot] += 1

    def clear(self, slot: int) -> None:
        """Make `slot` contribute nothing (its weights stay, unread)."""
        self.ranks[:, slot] = 0
        self.versions[slot] += 1
