"""What a training step minimises: supervised fine-tuning's cross-entropy, or DPO's preference loss.

Each objective turns a micro-batch of its examples into a batch, and a batch into a summed
loss, summed metrics and a weight. The loop divides sums by the step's total weight (target
tokens for SFT, pairs for DPO), so a step's loss and metrics are means however its examples
fall into micro-batches.

DPO (Rafailov et al., 2023), as TRL's `DPOTrainer` computes it with `loss_type="sigmoid"`:
for a prompt with a chosen and a rejected answer, whose summed log-probabilities are π_c, π_r
under the model being trained and ρ_c, ρ_r under the reference,

    loss = -log σ(β · ((π_c - ρ_c) - (π_r - ρ_r)))

with rewards β(π_c - ρ_c) and β(π_r - ρ_r). The reference is the starting point: the bare
base with a fresh adapter (whose B is zero), or the `--init-adapter`. Its log-probabilities
are computed once, before the first step (`DPO.prepare`), so no second copy of the model is
held and no adapter is switched off and on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plait.trainer.batching import Batch, collate
from plait.trainer.masking import TokenizedExample, TokenizedPair
from plait.trainer.model import loss_sum, sequence_logps

# TRL's names for what a DPO step reports.
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class SFT:
    """Cross-entropy on the answers' tokens; the weight of a batch is its target tokens."""

    def prepare(self, model, examples: list[TokenizedExample], batch_size: int, pad_id: int, device) -> list:
        return examples

    def collate(self, examples: list[TokenizedExample], pad_id: int) -> Batch:
        return collate(examples, pad_id)

    def weight(self, batch: Batch) -> int:
        return batch.targets

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return loss_sum(model, batch), {}


@dataclass(frozen=True)
class PairBatch:
    sequences: Batch  # the chosen sides' rows, then the rejected sides' in the same order
    reference: torch.Tensor  # [pairs, 2]: the reference's log-probability of each side

    @property
    def tokens(self) -> int:
        return self.sequences.tokens

    @property
    def targets(self) -> int:
        return self.sequences.targets

    @property
    def pairs(self) -> int:
        return self.reference.shape[0]

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.sequences.to(device), self.reference.to(device))


@dataclass(frozen=True)
class DPO:
    """The sigmoid preference loss; the weight of a batch is its pairs."""

    beta: float

    def collate(self, pairs: list[TokenizedPair], pad_id: int) -> PairBatch:
        if any(p.reference is None for p in pairs):
            raise ValueError("the pairs' reference log-probabilities are not computed yet (see prepare)")
        sequences = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        return PairBatch(sequences, torch.tensor([p.reference for p in pairs], dtype=torch.float32))

    def weight(self, batch: PairBatch) -> int:
        return batch.pairs

    def loss(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = sequence_logps(model, batch.sequences).chunk(2)
        chosen_rewards = self.beta * (chosen - batch.reference[:, 0])
        rejected_rewards = self.beta * (rejected - batch.reference[:, 1])
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
        with torch.no_grad():
            sums = (
                chosen_rewards,
                rejected_rewards,
                chosen_rewards - rejected_rewards,
                chosen_rewards > rejected_rewards,
            )
            metrics = {name: float(value.float().sum()) for name, value in zip(DPO_METRICS, sums, strict=True)}
        return losses.sum(), metrics

    @torch.no_grad()
    def prepare(
        self, model, pairs: list[TokenizedPair], batch_size: int, pad_id: int, device: torch.device
    ) -> list[TokenizedPair]:
        """The pairs with the model's current log-probabilities of both answers as their reference
        (dropout off). Called while the model is the starting point: before the first step, and
        on resuming before the checkpoint's weights are loaded (a fresh adapter is seeded)."""
        was_training = model.training
        model.eval()
        done = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            sequences = collate([p.chosen for p in chunk] + [p.rejected for p in chunk], pad_id).to(device)
            chosen, rejected = sequence_logps(model, sequences).cpu().chunk(2)
            done += [
                dataclasses.replace(p, reference=(float(c), float(r)))
                for p, c, r in zip(chunk, chosen, rejected, strict=True)
            ]
        model.train(was_training)
        return done
