"""What the API tests share: an in-process server for tests that need to reach inside (the real
app and context over a tiny random Llama, called through httpx's ASGI transport on the test's
own event loop)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.adapters.fusions import FusionStore
from plait.server.adapters.routers import RouterCache
from plait.server.adapters.store import AdapterStore
from plait.server.api.app import create_app
from plait.server.api.context import ServerContext
from plait.server.engine import Engine, EngineConfig, LoRAConfig
from plait.server.metrics import Metrics
from plait.server.storage.objects import FolderObjects


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
