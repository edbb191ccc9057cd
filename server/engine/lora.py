"""LoRA in the engine: every target linear layer adds, per token, the deltas of its adapters.

Each target module of the base (q/k/v/o and gate/up/down in every decoder layer) is wrapped
in a `LoRALinear` that owns a device pool of adapter weights indexed by slot. Which slots a
token uses arrives once per step as a `LoRABatch` (segment metadata) that every layer reads,
so a batch mixing many adapters, weighted combinations of them and the bare base model is
still one forward pass, with one kernel call per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from plait.kernels import LoRABatch, LoRAPool, SlotSpec, add_lora, make_lora_batch


class LoRAStep:
    """The current step's segment metadata, shared by every `LoRALinear` of one model."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, pool: LoRAPool, step: LoRAStep):
        super().__init__()
        self.base = base
        self.pool = pool
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.step.batch
        if batch is not None and batch.num_groups:
            add_lora(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.pool, batch)
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
            wrapped = LoRALinear(getattr(parent, name), pool, self.step)
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

    def set_segments(self, lengths: Sequence[int], slots: Sequence[SlotSpec]) -> None:
        """Segment metadata for the next forward pass (None when no token uses an adapter)."""
        uses_lora = any(s != -1 for s in slots)
        self.step.batch = make_lora_batch(lengths, slots, device=self.device) if uses_lora else None
