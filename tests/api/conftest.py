"""What the API tests share: random adapters in the embedded model's shapes, and an in-process
server for tests that need to reach inside (the real app and context over a tiny random Llama,
called through httpx's ASGI transport on the test's own event loop)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.adapters.fusions import FusionStore
from plait.server.adapters.routers import RouterCache
from plait.server.adapters.store import AdapterStore
from plait.server.api.app import create_app
from plait.server.api.context import ServerContext
from plait.server.engine import Engine, EngineConfig, LoRAConfig
from plait.server.metrics import Metrics
from plait.server.storage.objects import FolderObjects

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


@pytest.fixture
def in_process(tmp_path, tokenizer, tiny_llama):
    """Makes (app, context) with the engine running on a thread; everything stops afterwards."""
    started: list[tuple[Engine, threading.Thread]] = []

    def make(run_engine: bool = True):
        model = tiny_llama()
        targets = base_lora_targets(model)
        objects = FolderObjects(tmp_path / "store")
        store = AdapterStore(objects, tmp_path / "cache")
        fusions = FusionStore(objects)

        def read_version(adapter_id: str, version: int):
            return read_adapter(store.version_path(adapter_id, version), targets, 16)

        lora = LoRAConfig(targets=targets, load=lambda key: read_version(key.adapter_id, key.version), max_rank=16)
        engine = Engine(model, tokenizer, EngineConfig(kv_cache_tokens=2048), torch.device("cpu"), Metrics(), lora)
        context = ServerContext(
            engine=engine,
            tokenizer=tokenizer,
            model_name="tiny",
            metrics=engine.metrics,
            store=store,
            fusions=fusions,
            routers=RouterCache(read_version, fusions.router_weights, torch.device("cpu")),
            lora_targets=targets,
            max_lora_rank=16,
        )
        if run_engine:
            runner = threading.Thread(target=_run_quietly, args=(engine,), daemon=True)
            runner.start()
            started.append((engine, runner))
            deadline = time.monotonic() + 10
            while not engine.accepting and engine.failure is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        return create_app(context, drain_seconds=0), context

    yield make
    for engine, runner in started:
        engine.shutdown(drain_seconds=0)
        runner.join(10)


def _run_quietly(engine: Engine) -> None:
    with contextlib.suppress(Exception):  # a failing engine is what some tests are about; they read its failure
        engine.run()
