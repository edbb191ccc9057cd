"""Merging several adapters into one low-rank adapter: TIES and DARE on the full deltas.

The plain weighted sum of adapters needs no merge: the engine adds each member's delta,
times its weight, in the same forward pass (multi-slot rows), which is exact for any ranks.
TIES and DARE are not linear in the deltas (they prune entries and elect signs), so they
run once per combination on each module's full ΔWᵢ = scaleᵢ·Bᵢ·Aᵢ, and the merged ΔW is cut
back to low rank by SVD. That is what PEFT's `add_weighted_adapter` calls `ties_svd`,
`dare_linear_svd` and `dare_ties_svd`, computed the same way, so the two agree: same
pruning, same sign election, same members per module (only those that adapt it), the
same rank (the largest member rank unless one is asked for), and for DARE the same random
draws given the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from plait.server.adapters.format import LoRAAdapter, LoRAWeights

MergeMethod = Literal["ties", "dare_linear", "dare_ties"]
MERGE_METHODS: tuple[MergeMethod, ...] = ("ties", "dare_linear", "dare_ties")


@dataclass(frozen=True)
class MergeSpec:
    method: MergeMethod
    density: float = 1.0  # fraction of each delta's entries kept
    majority_sign_method: Literal["total", "frequency"] = "total"  # TIES' sign election
    rank: int | None = None  # rank of the result; None: the largest member rank
    seed: int = 0  # DARE's random drop, so one combination always merges to the same adapter

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; one of {', '.join(MERGE_METHODS)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")


def merge_adapters(
    members: Sequence[tuple[LoRAAdapter, float]], spec: MergeSpec, module_order: Iterable[str]
) -> LoRAAdapter:
    """One adapter whose delta at each module is the TIES/DARE merge of the members' deltas.

    `module_order` lists module paths in the base model's order (`base_lora_targets`); DARE
    draws its random masks in that order, member by member, as PEFT does.
    """
    rank = spec.rank or max(adapter.rank for adapter, _ in members)
    generator = torch.Generator().manual_seed(spec.seed)
    modules: dict[str, LoRAWeights] = {}
    for path in module_order:
        present = [(adapter.modules[path], weight) for adapter, weight in members if path in adapter.modules]
        if present:
            deltas = [w.scale * (w.b.float() @ w.a.float()) for w, _ in present]
            weights = torch.tensor([weight for _, weight in present])
            modules[path] = _low_rank(_merge(deltas, weights, spec, generator), rank)
    return LoRAAdapter(
        modules=modules,
        rank=max(w.rank for w in modules.values()),
        target_modules=tuple(sorted({path.rsplit(".", 1)[-1] for path in modules})),
        base_model_name=members[0][0].base_model_name,
        num_parameters=sum(w.a.numel() + w.b.numel() for w in modules.values()),
    )


def _merge(deltas: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec, generator: torch.Generator):
    if spec.method == "ties":
        pruned = torch.stack([_keep_largest(d, spec.density) for d in deltas])
    else:
        pruned = torch.stack([_drop_at_random(d, spec.density, generator) for d in deltas])
    weighted = pruned * weights.view(-1, 1, 1)
    if spec.method == "dare_linear":
        return weighted.sum(dim=0)
    # Sign election on the unweighted pruned deltas, then the mean of the entries that agree.
    votes = pruned.sum(dim=0) if spec.majority_sign_method == "total" else pruned.sign().sum(dim=0)
    agree = pruned.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    if k == 0:
        return torch.zeros_like(delta)
    # The k largest magnitudes, as PEFT's topk keeps them; a selection is cheaper than a sort.
    magnitude = delta.abs()
    threshold = magnitude.flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (magnitude >= threshold)


def _drop_at_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density  # rescaled so each entry keeps its expected value


def _low_rank(delta: torch.Tensor, rank: int) -> LoRAWeights:
    """The best rank-`rank` approximation of `delta` (the truncated SVD), as `b @ a`.

    Through the eigenvectors of the smaller Gram matrix, in float64: three times faster than
    `torch.linalg.svd` on a CPU, and exact where it matters, since only the top singular
    directions are kept. `a` holds the top right singular vectors and `b = delta @ a^T`, so
    `b @ a` projects `delta` onto them, as `U_r S_r V_r^T` does.
    """
    d = delta.double()
    if d.shape[0] < d.shape[1]:  # work on the side that gives the smaller Gram matrix
        return _transposed(_low_rank(delta.t(), rank))
    top = torch.linalg.eigh(d.t() @ d).eigenvectors[:, -rank:].flip(1)  # eigh sorts ascending
    return LoRAWeights(a=top.t().float().contiguous(), b=(d @ top).float().contiguous(), scale=1.0)


def _transposed(w: LoRAWeights) -> LoRAWeights:
    return LoRAWeights(a=w.b.t().contiguous(), b=w.a.t().contiguous(), scale=w.scale)
