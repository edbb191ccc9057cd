"""A job's hyperparameters: OpenAI's three (and DPO's `beta`), Plait's LoRA extension, and how
they map onto `plait train`.

Each may be given as a value, `"auto"`, or left out (both mean the default). Everything is
checked when the job is created, so a job that was queued never fails on its settings. A job
that starts from an existing adapter keeps that adapter's LoRA settings, so it may not give any.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from plait.server.errors import ClientError

BASE_LEARNING_RATE = 2e-4  # times learning_rate_multiplier; the usual QLoRA rate (and plait train's default)
MAX_MICRO_BATCH = 8  # a larger batch_size is reached by gradient accumulation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# name: (check given the server's largest LoRA rank, what the check wants)
_CHECKS: dict[str, tuple[Callable[[Any, int], bool], str]] = {
    "n_epochs": (lambda v, _: _is_int(v) and 1 <= v <= 100, "an integer from 1 to 100"),
    "batch_size": (lambda v, _: _is_int(v) and 1 <= v <= 256, "an integer from 1 to 256"),
    "learning_rate_multiplier": (lambda v, _: _is_number(v) and 0 < v <= 100, "a number above 0, at most 100"),
    "lora_rank": (lambda v, max_rank: _is_int(v) and 1 <= v <= max_rank, "an integer from 1 to {max_rank}"),
    "lora_alpha": (lambda v, _: _is_number(v) and 0 < v <= 1e6, "a number above 0"),
    "lora_dropout": (lambda v, _: _is_number(v) and 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "beta": (lambda v, _: _is_number(v) and 0 < v <= 2, "a number above 0, at most 2"),
}
LORA = ("lora_rank", "lora_alpha", "lora_dropout")
DPO_ONLY = ("beta",)
DEFAULT_BETA = 0.1
_FLOATS = frozenset({"learning_rate_multiplier", "lora_alpha", "lora_dropout", "beta"})


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int = 3
    batch_size: int = 4  # examples per optimizer step
    learning_rate_multiplier: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    beta: float | None = None  # DPO's; None for supervised jobs

    @classmethod
    def resolve(
        cls, given: Mapping[str, Any] | None, max_rank: int, method: str = "supervised", from_adapter: bool = False
    ) -> Hyperparameters:
        """Every hyperparameter with "auto" (or absent) replaced by its default; ClientError names a
        bad one. `method` is "supervised" or "dpo"; `from_adapter`: the job continues an adapter."""
        given = dict(given or {})
        known = [name for name in _CHECKS if method == "dpo" or name not in DPO_ONLY]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ClientError(
                f"Unknown hyperparameter '{unknown[0]}' for method '{method}'; known: {', '.join(known)}.",
                f"hyperparameters.{unknown[0]}",
                "invalid_value",
            )
        kept = [name for name in LORA if given.get(name, "auto") not in (None, "auto")]
        if from_adapter and kept:
            raise ClientError(
                f"hyperparameters.{kept[0]} cannot be set when starting from a fine-tuned model: "
                "its adapter keeps its own LoRA settings.",
                f"hyperparameters.{kept[0]}",
                "invalid_value",
            )
        resolved: dict[str, Any] = {"beta": DEFAULT_BETA} if method == "dpo" else {}
        for f in dataclasses.fields(cls):
            value = given.get(f.name, "auto")
            if value is None or value == "auto":
                continue
            ok, wanted = _CHECKS[f.name]
            if not ok(value, max_rank):
                raise ClientError(
                    f"hyperparameters.{f.name} must be 'auto' or {wanted.format(max_rank=max_rank)}, "
                    f"got {json.dumps(value)}.",
                    f"hyperparameters.{f.name}",
                    "invalid_value",
                )
            resolved[f.name] = float(value) if f.name in _FLOATS else value
        return cls(**resolved)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    @property
    def micro_batches(self) -> tuple[int, int]:
        """(examples per micro-batch, micro-batches per step) making one step of `batch_size` examples."""
        micro = max(d for d in range(1, min(self.batch_size, MAX_MICRO_BATCH) + 1) if self.batch_size % d == 0)
        return micro, self.batch_size // micro
