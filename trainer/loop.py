"""The training loop: micro-batches, gradient accumulation, schedule, evaluation, checkpoints.

A plain loop rather than transformers' Trainer, so that the loss normalisation, the data
order and what a checkpoint holds are all visible here and exactly reproducible on resume.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from plait.server.fine_tuning.contract import CheckpointEvent, EvalEvent, Event, StartEvent, StepEvent, steps_per_epoch
from plait.trainer.batching import plan_steps
from plait.trainer.checkpoint import load_checkpoint, save_checkpoint
from plait.trainer.config import TrainConfig
from plait.trainer.model import trainable_parameters
from plait.trainer.objectives import SFT
from plait.trainer.schedule import learning_rate, warmup_steps


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint and summed over resumed segments."""

    step: int = 0
    total_steps: int = 0
    epochs: float = 0.0  # passes over the training set completed, fractional within an epoch
    tokens: int = 0  # real tokens through the model (padding excluded)
    target_tokens: int = 0  # tokens the loss was taken on
    seconds: float = 0.0  # time in the loop, model loading excluded
    prepare_seconds: float = 0.0  # before the steps: DPO's reference log-probabilities (0 for SFT)
    train_loss: list[list[float]] = field(default_factory=list)  # [step, mean loss of that step]
    eval_loss: list[list[float]] = field(default_factory=list)
    train_metrics: list[list] = field(default_factory=list)  # [step, {name: mean}]: DPO's rewards
    eval_metrics: list[list] = field(default_factory=list)
    step_times: list[list[float]] = field(default_factory=list)  # [step, tokens, seconds]


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device):
    """Paged 8-bit AdamW on CUDA (QLoRA's choice: optimizer memory paged out under pressure), AdamW elsewhere."""
    if device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train(
    model,
    train_set: list,
    eval_set: list,
    config: TrainConfig,
    device: torch.device,
    pad_id: int,
    run_dir: Path,
    settings: dict,
    resume_from: Path | None = None,
    events: Callable[[Event], None] | None = None,
    objective=None,
) -> Progress:
    """Train `model`'s adapters in place; checkpoints go to run_dir/checkpoints with `settings` in them.

    `objective` (`plait.trainer.objectives`, SFT by default) says what the examples are and what
    a step minimises. `events(event)`, when given, hears of the start, every step, evaluation
    and checkpoint (`plait.server.fine_tuning.contract.EventWriter` writes them to `--events`).
    """
    events = events or (lambda event: None)
    objective = objective or SFT()
    c = config
    prepare_started = time.perf_counter()
    train_set = objective.prepare(model, train_set, c.batch_size, pad_id, device)
    eval_set = objective.prepare(model, eval_set, c.batch_size, pad_id, device)
    prepare_seconds = time.perf_counter() - prepare_started
    plan = plan_steps(len(train_set), c.batch_size, c.grad_accum, c.epochs, c.max_steps, c.seed)
    epoch_steps = steps_per_epoch(len(train_set), config.batch_size, config.grad_accum)
    warmup = warmup_steps(len(plan), config.warmup_ratio, config.warmup_steps)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, config, device)
    progress = Progress(total_steps=len(plan))
    if resume_from is not None:
        saved = load_checkpoint(resume_from, model, optimizer)
        progress = Progress(**{f.name: saved[f.name] for f in dataclasses.fields(Progress) if f.name in saved})
    progress.prepare_seconds += prepare_seconds

    events(StartEvent(total_steps=len(plan), examples=len(train_set), resumed_from_step=progress.step or None))
    model.train()
    bar = tqdm(total=len(plan), initial=progress.step, desc="plait train", unit="step", dynamic_ncols=True)
    segment_tokens, segment_seconds = 0, 0.0  # this process's share, for the bar's tokens/s
    for index in range(progress.step, len(plan)):
        step_started = time.perf_counter()
        lr = learning_rate(index, len(plan), warmup, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [objective.collate([train_set[i] for i in micro], pad_id) for micro in plan[index].micro_batches]
        # Every target token (SFT) or pair (DPO) of the step weighs the same, however they fall
        # into micro-batches: each micro-batch's summed loss is divided by the step's total.
        step_weight = sum(objective.weight(b) for b in batches)
        step_targets = sum(b.targets for b in batches)
        step_loss, step_metrics = 0.0, {}
        for batch in batches:
            loss, metrics = objective.loss(model, batch.to(device))
            (loss / step_weight).backward()
            step_loss += loss.item()
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value
        step_loss /= step_weight
        step_metrics = {name: value / step_weight for name, value in step_metrics.items()}
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_tokens = sum(b.tokens for b in batches)
        progress.step = index + 1
        progress.epochs = progress.step / epoch_steps
        progress.tokens += step_tokens
        progress.target_tokens += step_targets
        step_seconds = time.perf_counter() - step_started
        progress.seconds += step_seconds
        progress.train_loss.append([progress.step, step_loss])
        if step_metrics:
            progress.train_metrics.append([progress.step, step_metrics])
        progress.step_times.append([progress.step, step_tokens, round(step_seconds, 4)])
        segment_tokens += step_tokens
        segment_seconds += step_seconds
        bar.update(1)
        shown = {name.removeprefix("rewards/"): f"{value:.3f}" for name, value in step_metrics.items()}
        bar.set_postfix(
            loss=f"{step_loss:.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{segment_tokens / segment_seconds:.0f}"
        )
        events(
            StepEvent(
                step=progress.step,
                total_steps=len(plan),
                train_loss=step_loss,
                learning_rate=lr,
                tokens=progress.tokens,
                epochs=round(progress.epochs, 4),
                metrics=step_metrics,
            )
        )

        last = progress.step == len(plan)
        if eval_set and (last or (config.eval_every and progress.step % config.eval_every == 0)):
            eval_loss, eval_metrics = evaluate(model, objective, eval_set, config.batch_size, pad_id, device)
            progress.eval_loss.append([progress.step, eval_loss])
            if eval_metrics:
                progress.eval_metrics.append([progress.step, eval_metrics])
            shown = "".join(f", {name} {value:.4f}" for name, value in eval_metrics.items())
            bar.write(f"step {progress.step}: eval loss {eval_loss:.4f}{shown}")
            events(EvalEvent(step=progress.step, eval_loss=eval_loss, metrics=eval_metrics))
        if config.save_every and progress.step % config.save_every == 0 and not last:
            saved = save_checkpoint(
                run_dir, progress.step, model, optimizer, {**dataclasses.asdict(progress), "settings": settings}
            )
            events(CheckpointEvent(step=progress.step, path=str(saved), train_loss=step_loss))
    bar.close()
    return progress


@torch.no_grad()
def evaluate(
    model, objective, examples: list, batch_size: int, pad_id: int, device: torch.device
) -> tuple[float, dict[str, float]]:
    """Mean loss (and metrics) over the whole set, weighted as in training, with dropout off."""
    model.eval()
    total, weight, metrics = 0.0, 0, {}
    for start in range(0, len(examples), batch_size):
        batch = objective.collate(examples[start : start + batch_size], pad_id)
        loss, sums = objective.loss(model, batch.to(device))
        total += loss.item()
        weight += objective.weight(batch)
        for name, value in sums.items():
            metrics[name] = metrics.get(name, 0.0) + value
    model.train()
    return total / weight, {name: value / weight for name, value in metrics.items()}
