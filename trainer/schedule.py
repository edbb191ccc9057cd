"""The learning rate at each optimizer step: linear warmup, then cosine decay towards zero.

A pure function of the step, so a resumed run needs no scheduler state: the step is enough.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """Steps of warmup: the explicit count when given, else the ratio of the run (rounded up)."""
    steps = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total_steps)
    return min(steps, total_steps)


def learning_rate(step: int, total_steps: int, warmup: int, peak_lr: float) -> float:
    """The rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup ramps as (step + 1) / warmup so its last step trains at the peak (transformers'
    step / warmup spends the first step at zero); the cosine then falls from the peak at the
    first step after warmup towards zero, which the step after the last would reach.
    """
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
