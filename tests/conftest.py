"""Fixtures that start real `plait serve` processes on loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

STARTUP_SECONDS = 300  # the first start converts the embedded model once


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    model: str = "SmolLM2-135M-Instruct"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "unused"), **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.base_url}/metrics").text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_dir: Path, *args: str) -> LiveServer:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    if "--data-dir" not in args:
        args = ("--data-dir", str(tmp_dir / f"data-{port}"), *args)
    cmd = [sys.executable, "-m", "plait.cli", "serve", "--port", str(port), "--threads", "2", *args]
    log = open(log_path, "w")  # noqa: SIM115 -- lives as long as the process
    # cwd outside the checkout: a repo-root `kernels/` on sys.path would shadow the PyPI package.
    proc = subprocess.Popen(
        cmd, cwd=tmp_dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start in {STARTUP_SECONDS}s:\n{log_path.read_text()[-3000:]}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    """The embedded model with default settings, shared by every API test."""
    s = start_server(tmp_path_factory.mktemp("server"))
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client(max_retries=0)


class _Launcher:
    """Starts servers with extra flags and stops them all when its fixture ends."""

    def __init__(self, tmp_dir: Path):
        self.tmp_dir = tmp_dir
        self.started: list[LiveServer] = []

    def __call__(self, *args: str) -> LiveServer:
        self.started.append(start_server(self.tmp_dir, *args))
        return self.started[-1]

    def stop_all(self) -> None:
        for s in self.started:
            stop_server(s)


@pytest.fixture(scope="module")
def launch_module_server(tmp_path_factory):
    """A server shared by the tests of one module."""
    launcher = _Launcher(tmp_path_factory.mktemp("servers"))
    yield launcher
    launcher.stop_all()


@pytest.fixture
def launch_server(tmp_path):
    """A server for one test."""
    launcher = _Launcher(tmp_path)
    yield launcher
    launcher.stop_all()


def _score_with_peft(model, adapter: str | None, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """PEFT's logprob of each of `new_ids` after `prompt_ids`, with `adapter` active (None: the base)."""
    ids = torch.tensor([prompt_ids + list(new_ids)])
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits[0].float()
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=ids).logits[0].float()
    scores = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]
    return scores.gather(1, torch.tensor(list(new_ids))[:, None]).squeeze(1)


@pytest.fixture(scope="session")
def peft_logprobs():
    return _score_with_peft


FINE_TUNING_ADMIN_KEY = "ft-admin"


@pytest.fixture(scope="session")
def fine_tuning_server(tmp_path_factory) -> Iterator[LiveServer]:
    """The files and fine-tuning API tests' server: admin key `ft-admin`, 1 MiB files, and jobs that
    train fast on the CPU (fp32 compute: bf16 pays a one-off 20-70 s in its first step; one thread
    each for serving and training, so neither starves the other on two cores)."""
    s = start_server(
        tmp_path_factory.mktemp("fine-tuning"),
        "--admin-key",
        FINE_TUNING_ADMIN_KEY,
        "--max-file-mb",
        "1",
        "--train-dtype",
        "float32",
        "--train-threads",
        "1",
        "--threads",
        "1",
    )
    yield s
    stop_server(s)
