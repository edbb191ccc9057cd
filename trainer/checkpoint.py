"""Checkpoints of a run in progress, for `--resume`.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding the adapter in PEFT format (so
any checkpoint is itself a usable adapter), the optimizer's state and the RNG states as
safetensors, and the trainer's progress as JSON. Nothing is pickled. Each is written under a
temporary name and renamed into place, so a crash mid-save leaves the previous one intact;
only the newest is kept. The learning-rate schedule and the data order are functions of the
step and the seed, so the step is all the position there is to save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plait.trainer.model import write_adapter

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"  # written last: a folder without it is not a checkpoint
_NAME = re.compile(r"step-(\d+)")


def save_checkpoint(run_dir: Path, step: int, model, optimizer: torch.optim.Optimizer, progress: dict) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_adapter(model, staging)
    tensors, scalars = _flatten_optimizer_state(optimizer.state_dict()["state"])
    tensors.update(_rng_tensors())
    save_file(tensors, staging / "optimizer.safetensors")
    (staging / STATE_FILE).write_text(json.dumps({**progress, "step": step, "optimizer_scalars": scalars}))
    os.replace(staging, final)
    for older in root.iterdir():
        if older != final and _NAME.fullmatch(older.name):
            shutil.rmtree(older)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)), default=None)


def read_progress(path: Path) -> dict:
    """The progress saved with a checkpoint, without loading any tensor (to check settings early)."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer state and RNG states in place; return the saved progress."""
    from peft import set_peft_model_state_dict

    progress = read_progress(path)
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not match the model (unexpected {result.unexpected_keys[0]})")
    tensors = load_file(path / "optimizer.safetensors")
    state = _unflatten_optimizer_state(tensors, progress.pop("optimizer_scalars"))
    # The parameter groups (lr, betas, decay) come from the run's own config; lr is set by
    # the schedule before every step. Only the per-parameter moments are restored.
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    _restore_rng(tensors)
    return progress


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    # {param index: {name: tensor or number}} -> safetensors keys "optim.{index}.{name}" and
    # a JSON dict of the non-tensor values (bitsandbytes keeps some as plain numbers).
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state.items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, scalars


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "optim":
            state.setdefault(int(index), {})[name] = value
    for index, values in scalars.items():
        state.setdefault(int(index), {}).update(values)
    return state


def _rng_tensors() -> dict[str, torch.Tensor]:
    # LoRA dropout draws from these; restoring them makes a resumed run bit-identical.
    rng = {"rng.cpu.0": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu.0"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
