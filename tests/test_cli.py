"""`plait serve` refuses a model or a setting it cannot serve with one line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", "serve", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def _model_folder(tmp_path, config: dict, weights: str | None = "model.safetensors"):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / weights).write_bytes(b"\0" * 16)
    return folder


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "model folder not found"),
        (lambda p: _model_folder(p, {"model_type": "gpt2"}), "unsupported model type 'gpt2'"),
        (lambda p: _model_folder(p, {}), "unsupported model type None"),
        (lambda p: _model_folder(p, {"model_type": "llama"}, "pytorch_model.bin"), "no .safetensors weights"),
        (lambda p: _model_folder(p, {"model_type": "llama"}), "cannot load"),
    ],
)
def test_unusable_model_is_a_one_line_error(tmp_path, make, expected):
    result = _serve(tmp_path, "--model", str(make(tmp_path)), "--port", "1")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("plait serve: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stdout


def test_help_lists_the_serving_flags(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "plait.cli", "serve", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    ).stdout
    flags = ("--model", "--port", "--api-key", "--kv-cache-tokens", "--max-waiting", "--max-batched-tokens")
    for flag in (*flags, "--cpu-weights", "--no-prefix-caching", "--cuda-graphs"):
        assert flag in out


def test_cuda_graphs_without_a_gpu_is_a_one_line_error(tmp_path):
    result = _serve(tmp_path, "--cuda-graphs", "--device", "cpu", "--port", "1")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "plait serve: error: --cuda-graphs needs a CUDA device" in result.stdout
