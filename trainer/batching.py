"""Which examples each optimizer step trains on, and padding them into tensors.

The plan is a pure function of the seed and the sizes, so a resumed run recomputes it and
picks up at its step without saving a data loader's state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from plait.trainer.masking import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class Step:
    epoch: int  # 0-based
    micro_batches: tuple[tuple[int, ...], ...]  # example indices; their gradients are accumulated


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, longest], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX on padding and on every token not trained on
    tokens: int  # real (unpadded) tokens, what tokens/s counts
    targets: int  # tokens the loss is taken on (labels after the shift by one)

    def to(self, device: torch.device) -> Batch:
        move = {"device": device, "non_blocking": True}
        return Batch(
            self.input_ids.to(**move), self.attention_mask.to(**move), self.labels.to(**move), self.tokens, self.targets
        )


def plan_steps(
    num_examples: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None, seed: int
) -> list[Step]:
    """Every optimizer step of the run: `epochs` passes over the data, or exactly `max_steps` steps.

    Each epoch is a fresh shuffle; an epoch's last step may hold fewer micro-batches (the loss
    is normalised by target tokens, so a short step is not over-weighted).
    """
    if num_examples < 1:
        raise ValueError("no examples to train on")
    steps: list[Step] = []
    epoch = 0
    while (epoch < epochs) if max_steps is None else (len(steps) < max_steps):
        order = list(range(num_examples))
        random.Random(f"plait-{seed}-{epoch}").shuffle(order)  # a string seed is stable across runs
        micro = [tuple(order[i : i + batch_size]) for i in range(0, num_examples, batch_size)]
        steps.extend(Step(epoch, tuple(micro[i : i + grad_accum])) for i in range(0, len(micro), grad_accum))
        epoch += 1
    return steps if max_steps is None else steps[:max_steps]


def collate(examples: list[TokenizedExample], pad_id: int) -> Batch:
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return Batch(input_ids, attention_mask, labels, int(attention_mask.sum()), targets)
