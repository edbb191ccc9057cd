"""The engine: continuous batching of generation requests over one model with LoRA slots.

Callers (the HTTP API, `plait serve`, benchmarks) use only the names exported here; the
submodules are the engine's own business:

- `engine`: the loop, its inbox and the request handle; `scheduler` picks each step's tokens,
  `model_runner` runs one flattened forward pass, `attention` and `kv_cache` keep keys and
  values in a paged pool, `sampler` and `detokenizer` turn logits into text.
- `lora` wraps the base model's linear layers so every token gets its own adapters' deltas
  through `plait.kernels`; `adapter_slots` keeps adapters in device slots and a CPU cache,
  reading them through the `load` (and `merge`) functions the engine is given.
- `routing` is what the engine asks of a fusion's router (built in `plait.server.adapters`).

The engine imports nothing of the rest of the server but the leaf modules `plait.server.errors`
and `plait.server.metrics`: adapters arrive as keys and loader functions, routers as objects.
"""

from plait.server.engine.adapter_slots import AdapterKey, MergedKey, SlotKey
from plait.server.engine.attention import ATTENTION_NAME
from plait.server.engine.engine import (
    Engine,
    EngineBusy,
    EngineConfig,
    EngineUnavailable,
    LoRAConfig,
    RequestHandle,
)
from plait.server.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from plait.server.engine.routing import Router

__all__ = [
    "ATTENTION_NAME",
    "AdapterKey",
    "Engine",
    "EngineBusy",
    "EngineConfig",
    "EngineUnavailable",
    "FinishReason",
    "LoRAConfig",
    "MergedKey",
    "RequestHandle",
    "RequestOutput",
    "Router",
    "SamplingParams",
    "SlotKey",
    "TokenLogprob",
]
