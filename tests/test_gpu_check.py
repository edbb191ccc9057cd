"""bench/gpu_check.sh, the GPU checks in one command, run end to end with --smoke on the CPU.

GPU sessions are rare and short, so the script must not have rotted when one comes: its steps,
the benchmarks' correctness checks (the Triton interpreter against the PyTorch path) and the
JSON files it leaves are exercised here at tiny shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_run_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {
        "env.json",
        "env.log",
        "kernels.json",
        "kernels.log",
        "attention.json",
        "attention.log",
    }
    env_info = json.loads((tmp_path / "env.json").read_text())
    assert env_info["torch"] and env_info["cuda_available"] is False
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    modules = {row["module"] for row in kernels["rows"]}
    assert modules == {"o_proj", "qkv_proj", "gate_up", "down_proj"}
    assert all(row["triton_us"] > 0 and row["loop_us"] > 0 for row in kernels["rows"])
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert len(attention["rows"]) == 2 and all(row["triton_us"] > 0 for row in attention["rows"])


@pytest.mark.slow
def test_gpu_check_fails_when_a_step_fails(tmp_path):
    """A broken step must show in the exit status, not only in its log."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)],  # no --smoke and no GPU: the benchmarks refuse
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 1
    assert "needs a CUDA GPU" in (tmp_path / "kernels.log").read_text()
    assert (tmp_path / "env.json").exists()
