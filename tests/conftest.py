"""Fixtures shared by the whole suite: real `plait serve` processes on loopback ports, the embedded
model's tokenizer, and tiny random Llamas for in-process engine tests.

Tests that start a server or train a model are marked `slow` (servers by the fixtures they use,
training by hand); `make test` runs everything, `make test-fast` everything else.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

STARTUP_SECONDS = 300  # the first start converts the embedded model once
SERVER_FIXTURES = {"server", "client", "launch_server", "launch_module_server", "fine_tuning_server"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a server or trains a model (left out by `make test-fast`)")


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer."""
    from plait.server.base_model import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """Makes a small random Llama that the engine can run (its paged attention), with the embedded
    model's vocabulary: engine tests in milliseconds per step instead of a real model's seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from plait.server.engine import ATTENTION_NAME

    def make(hidden: int = 64, layers: int = 2, seed: int = 0, attention: str = ATTENTION_NAME):
        torch.manual_seed(seed)
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
        )
        return LlamaForCausalLM._from_config(config, attn_implementation=attention).eval()

    return make


# Every architecture Plait serves, as a tiny random model with the real structure: Llama 3's
# rope scaling, Qwen3's q/k norms, Gemma's scaled embeddings, Gemma 2's soft-capping and
# alternating sliding windows, Gemma 3's window pattern and local rope, Phi-3's fused
# qkv_proj and gate_up_proj. Windows are 8 tokens, so test prompts run past them.
WINDOW = 8
ARCHITECTURES = {
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
            rope_theta=500000.0,
        )
    ),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(),
    "gemma": dict(),
    "gemma2": dict(sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "phi3": dict(sliding_window=WINDOW),
}


# Each family's own chat template (tests/fixtures/chat_templates, verbatim) and the markers its
# real tokenizer holds as special tokens, added to the embedded model's tokenizer to stand in.
CHAT_TEMPLATES = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": ("[INST]", "[/INST]"),
    "qwen2_5": (),
    "qwen3": (),
    "gemma2": ("<start_of_turn>", "<end_of_turn>"),
    "gemma3": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "phi4": ("<|im_sep|>",),
}
FAMILY_TEMPLATE = {
    "llama": "llama3",
    "mistral": "mistral",
    "qwen2": "qwen2_5",
    "qwen3": "qwen3",
    "gemma": "gemma2",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
SPARE_VOCAB = 16  # embedding rows past the embedded tokenizer's, for the markers above


def chat_tokenizer(template: str):
    """The embedded model's tokenizer with one family's chat template and special tokens."""
    from plait.server.base_model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(None))
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TEMPLATES[template])})
    tokenizer.chat_template = (Path(__file__).parent / "fixtures" / "chat_templates" / f"{template}.jinja").read_text()
    return tokenizer


@pytest.fixture(scope="session")
def tiny_architecture(tokenizer, tmp_path_factory):
    """Makes (once per session) a Hugging Face folder holding a tiny random model of one of
    `ARCHITECTURES`, in bf16, with the embedded model's tokenizer carrying the family's own chat
    template, as `plait serve --model` and `plait train --model` read it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("architectures")

    def make(model_type: str) -> Path:
        folder = root / model_type
        if not folder.is_dir():
            config = AutoConfig.for_model(
                model_type,
                vocab_size=len(tokenizer) + SPARE_VOCAB,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **ARCHITECTURES[model_type],
            )
            torch.manual_seed(sorted(ARCHITECTURES).index(model_type))
            AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
            chat_tokenizer(FAMILY_TEMPLATE[model_type]).save_pretrained(folder)
        return folder

    return make


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path
    model: str = "SmolLM2-135M-Instruct"

    def trainer_pids(self, job_id: str) -> list[int]:
        """Processes working in the job's folder on this server: its trainer, if one runs."""
        job_dir = self.data_dir / "jobs" / job_id
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == job_dir:
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

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


def start_server(tmp_dir: Path, *args: str, env: dict[str, str] | None = None) -> LiveServer:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    if "--data-dir" not in args:
        args = ("--data-dir", str(tmp_dir / f"data-{port}"), *args)
    data_dir = Path(args[args.index("--data-dir") + 1]).resolve()
    if "--dtype" not in args:  # what the PEFT references compute in, on any CPU (auto would measure)
        args = ("--dtype", "bfloat16", *args)
    cmd = [sys.executable, "-m", "plait.cli", "serve", "--port", str(port), "--threads", "2", *args]
    log = open(log_path, "w")  # noqa: SIM115 -- lives as long as the process
    # cwd outside the checkout: a repo-root `kernels/` on sys.path would shadow the PyPI package.
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
    )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log_path, data_dir)
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

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> LiveServer:
        self.started.append(start_server(self.tmp_dir, *args, env=env))
        return self.started[-1]

    def stop_all(self) -> None:
        for s in self.started:
            if s.process.poll() is None:
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


def peft_distributions(model, adapter: str | None, prompt_ids, new_ids) -> torch.Tensor:
    """PEFT's log-probabilities over the vocabulary for each of `new_ids` after `prompt_ids`
    ([len(new_ids), vocab]), with `adapter` active (None: the base)."""
    ids = torch.tensor([list(prompt_ids) + list(new_ids)])
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits[0].float()
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]


def _score_with_peft(model, adapter: str | None, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """PEFT's logprob of each of `new_ids` after `prompt_ids`, with `adapter` active (None: the base)."""
    scores = peft_distributions(model, adapter, prompt_ids, new_ids)
    return scores.gather(1, torch.tensor(list(new_ids))[:, None]).squeeze(1)


@pytest.fixture(scope="session")
def chat_tokenizers():
    """`make(template)`: see `chat_tokenizer`."""
    return chat_tokenizer


@pytest.fixture(scope="session")
def peft_logprobs():
    return _score_with_peft


@pytest.fixture(scope="session")
def peft_greedy_margin():
    """How far below PEFT's best token each of `new_ids` scores, at most (0 when every one is
    PEFT's own greedy choice)."""

    def margin(model, adapter: str | None, prompt_ids, new_ids) -> float:
        scores = peft_distributions(model, adapter, prompt_ids, new_ids)
        chosen = scores.gather(1, torch.tensor(list(new_ids))[:, None]).squeeze(1)
        return float((scores.max(-1).values - chosen).max())

    return margin


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


# --- real services on loopback: PostgreSQL (pgserver ships its binaries) and an S3 server (moto) ----


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One PostgreSQL for the run, listening on a socket in a temporary folder. It must start: a
    test that needs it fails rather than skips."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def new_postgres_database(postgres_server):
    """`new_postgres_database()`: the URL of a new, empty database on the run's PostgreSQL."""
    import secrets

    import psycopg

    def make() -> str:
        name = "plait_" + secrets.token_hex(6)
        with psycopg.connect(postgres_server.get_uri(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return postgres_server.get_uri(name)

    return make


@pytest.fixture
def postgres_url(new_postgres_database) -> str:
    """A fresh, empty database of its own for each test."""
    return new_postgres_database()


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str]  # credentials and region, for clients and the servers tests start

    def new_bucket(self) -> str:
        import secrets

        name = "plait-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )


def _atomic_conditional_writes() -> None:
    """moto checks a write's condition (If-Match, If-None-Match) and then writes, in two steps, so
    two racing conditional writes can both succeed (seen under load: 2 winners of 8 racers). S3
    documents that exactly one does; one lock around moto's put and delete gives that."""
    import functools

    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name)
        if getattr(original, "atomic", False):
            continue

        @functools.wraps(original)
        def atomic(self, *args, original=original, **kwargs):
            with lock:
                return original(self, *args, **kwargs)

        atomic.atomic = True
        setattr(S3Response, name, atomic)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3-compatible server on a loopback port, for the run, with S3's atomic conditional
    writes (see `_atomic_conditional_writes`)."""
    from moto.server import ThreadedMotoServer

    _atomic_conditional_writes()

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "plait-test", "AWS_SECRET_ACCESS_KEY": "plait-test", "AWS_DEFAULT_REGION": "us-east-1"}
    yield S3Server(f"http://{host}:{port}", env)
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch) -> str:
    """A fresh bucket for each test, its name; the AWS variables point this process at the server."""

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.new_bucket()


# --- random adapters in the embedded model's shapes ----------------------------------------------

# SmolLM2-135M: hidden size, key/value width, decoder layers.
HIDDEN, KV, LAYERS = 576, 192, 30


def write_adapter(folder: Path, seed: int, base: str | None = None, rank: int = 4) -> Path:
    """A random PEFT adapter on q_proj and v_proj of every layer of the embedded model."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, out in (("q_proj", HIDDEN), ("v_proj", KV)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=generator) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.05
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    if base is not None:
        config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def random_adapter():
    """`write_adapter(folder, seed, base=None, rank=4)`: a random adapter for the embedded model."""
    return write_adapter
