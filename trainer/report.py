"""What a finished run leaves next to its adapter: training_report.json and loss_curve.png."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from plait.server.fine_tuning.contract import REPORT_FILE

LOSS_CURVE_FILE = "loss_curve.png"


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory: allocated tensors on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"kind": "process_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def plot_loss_curve(path: Path, train_loss: list[list[float]], eval_loss: list[list[float]]) -> None:
    # Figure without pyplot: the Agg canvas, no GUI backend, no global state shared with a caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train_loss:
        steps, losses = zip(*train_loss, strict=True)
        axes.plot(steps, losses, label="train", linewidth=1.2)
    if eval_loss:
        steps, losses = zip(*eval_loss, strict=True)
        axes.plot(steps, losses, label="eval", marker="o", linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean over trained tokens)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
