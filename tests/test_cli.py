"""`plait serve` refuses a model, a setting or shared state it cannot use with one line, not a traceback."""

from __future__ import annotations

import json
import os
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


def _newer_database(tmp_path) -> str:
    import sqlite3

    path = tmp_path / "newer.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (99)")
    return f"sqlite:///{path}"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (lambda p, s3: ("--store", "ftp://somewhere/x"), "use file:///path or s3://bucket/prefix"),
        (lambda p, s3: ("--store", "s3://no-such-bucket", "--s3-endpoint-url", s3.endpoint_url), "no-such-bucket"),
        (lambda p, s3: ("--database", "mysql://db/plait"), "mysql"),
        (lambda p, s3: ("--database", _newer_database(p)), "upgrade plait"),
        (lambda p, s3: ("--database", f"postgresql://nobody@127.0.0.1:{_closed_port()}/x"), "127.0.0.1"),
        (lambda p, s3: ("--store-poll-seconds", "0"), "--store-poll-seconds must be more than 0"),
    ],
)
def test_unusable_shared_state_is_a_one_line_error(tmp_path, s3_server, flags, expected):
    """Found before the model loads, said in one line, with no password in it."""
    result = subprocess.run(
        [sys.executable, "-m", "plait.cli", "serve", "--data-dir", str(tmp_path / "data"), *flags(tmp_path, s3_server)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **s3_server.env},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("plait serve: error:")]
    assert len(lines) == 1 and expected in lines[0], result.stdout


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
