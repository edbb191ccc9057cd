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


def run_gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    # Wheels fetched for a GPU machine's Python (.whl/) are not for this one.
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "WHEELS": str(out / "no-wheels")}
    script = ROOT / "bench" / "gpu_check.sh"
    return subprocess.run(["bash", str(script), str(out), *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_gpu_check_smoke_run_writes_every_result(tmp_path):
    run = run_gpu_check(tmp_path, "--smoke")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {
        "env.json",
        "kernels.json",
        "attention.json",
        "engine.json",
        "training.json",
        "steps.log",
    }
    assert "FAILED" not in (tmp_path / "steps.log").read_text()
    env_info = json.loads((tmp_path / "env.json").read_text())
    assert env_info["torch"] and env_info["cuda_available"] is False
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    modules = {row["module"] for row in kernels["rows"]}
    assert modules == {"o_proj", "qkv_proj", "gate_up", "down_proj"}
    assert all(row["triton_us"] > 0 and row["loop_us"] > 0 for row in kernels["rows"])
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert len(attention["rows"]) == 2 and all(row["triton_us"] > 0 for row in attention["rows"])
    engine = json.loads((tmp_path / "engine.json").read_text())
    assert engine["all_linear"] and engine["mix"] == "distinct" and len(engine["modules"]) == 7
    (row,) = engine["rows"]
    assert row["adapters"] == 4 and row["plait_tokens_per_s"] > 0 and row["no_adapter_tokens_per_s"] > 0
    training = json.loads((tmp_path / "training.json").read_text())
    for side in ("plait", "trainer"):
        (result,) = training[side]
        assert result["tokens_per_second"] > 0 and result["peak_memory_bytes"] > 0


def test_gpu_check_without_a_gpu_refuses_at_once(tmp_path):
    """Without --smoke it would build an 8B-shaped model; on a machine with no GPU it says so instead."""
    run = run_gpu_check(tmp_path)
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr
    assert not (tmp_path / "steps.log").exists()
