"""Decode steps through the fixed buffers of a capturable step (`--cuda-graphs`) against the
dynamic path, on the CPU where the same buffers run eagerly.

Two engines on the same tiny random Llama and the same adapters serve the same requests, one
with the static decode step and one without; greedy tokens and their logprobs must agree.
The requests mix the bare model, two adapters and weighted pairs (which the static step leaves
to the dynamic path), and end one after another, so steps of every size run, padded or not.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import torch

from plait.server.adapters.format import LoRAWeights, base_lora_targets
from plait.server.engine import AdapterKey, Engine, EngineConfig, LoRAConfig, SamplingParams
from plait.server.engine.request import Request, ScheduledChunk
from plait.server.engine.static_decode import capture_sizes
from plait.server.metrics import Metrics

RANK = 4
PROMPTS = ["Hello there", "The capital of France is", "One two three four five six", "Why", "Tell me a story"]


def load_adapter(targets):
    def load(key: AdapterKey):
        generator = torch.Generator().manual_seed(ord(key.adapter_id))

        def weights(n_in: int, n_out: int) -> LoRAWeights:
            return LoRAWeights(
                torch.randn(RANK, n_in, generator=generator) * 0.3, torch.randn(n_out, RANK, generator=generator), 1.0
            )

        return SimpleNamespace(modules={path: weights(*in_out) for path, in_out in targets.items()})

    return load


def serve_all(model, tokenizer, cuda_graph_batch: int):
    """Every prompt with every adapter choice, all at once; the final outputs, and the static step's batch sizes."""
    targets = base_lora_targets(model)
    lora = LoRAConfig(targets=targets, load=load_adapter(targets), max_device_adapters=3, max_rank=RANK)
    config = EngineConfig(kv_cache_tokens=1024, cuda_graph_batch=cuda_graph_batch)
    engine = Engine(model, tokenizer, config, torch.device("cpu"), Metrics(), lora)
    static_batches = []
    if engine.runner.static is not None:
        run = engine.runner.static.run
        engine.runner.static.run = lambda chunks: static_batches.append(len(chunks)) or run(chunks)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    choices = [(), ((AdapterKey("a", 1), 1.0),), ((AdapterKey("b", 1), 1.0),)]
    choices.append(((AdapterKey("a", 1), 0.5), (AdapterKey("b", 1), 0.5)))

    async def one(prompt, adapters, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, top_logprobs=0)
        handle = engine.submit(tokenizer.encode(prompt), params, adapters=adapters)
        async with asyncio.timeout(60):
            return [o async for o in handle.outputs()][-1]

    async def everything():
        # Weighted pairs end early; the others one after another, the first submitted (which
        # holds the pool's first blocks) last, so the batch shrinks through sizes the static
        # step takes, padded or not, while every block is still in use.
        jobs = [(p, a) for p in PROMPTS for a in choices]
        return await asyncio.gather(
            *(one(p, a, 2 if len(a) > 1 else 3 + len(jobs) - i) for i, (p, a) in enumerate(jobs))
        )

    try:
        outputs = asyncio.run(everything())
    finally:
        engine.shutdown(drain_seconds=0)
        thread.join(10)
    return outputs, static_batches


def test_static_decode_steps_give_the_dynamic_paths_tokens_and_logprobs(tiny_llama, tokenizer):
    dynamic, none = serve_all(tiny_llama(seed=3), tokenizer, cuda_graph_batch=0)
    static, batches = serve_all(tiny_llama(seed=3), tokenizer, cuda_graph_batch=8)
    assert none == []
    # Decode steps ran through the buffers, at sizes that needed padding as well as full ones
    # (which sizes depends on how many requests the engine had taken in when stepping began).
    sizes = capture_sizes(8)
    assert any(b in sizes for b in batches) and any(b not in sizes for b in batches), batches
    for d, s in zip(dynamic, static, strict=True):
        assert d.error is None and s.error is None
        assert s.token_ids == d.token_ids
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in s.logprobs]),
            torch.tensor([lp.logprob for lp in d.logprobs]),
            atol=1e-4,
            rtol=0,
        )
    # The adapters change the answers, so agreeing above means the static step applied them.
    assert len({d.token_ids for d in dynamic[:4]}) > 1


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(30) == [1, 2, 4, 8, 16, 24, 30]


def test_only_plain_decodes_fit(tiny_llama, tokenizer):
    model = tiny_llama()
    targets = base_lora_targets(model)
    lora = LoRAConfig(targets=targets, load=load_adapter(targets), max_device_adapters=2, max_rank=RANK)
    engine = Engine(
        model, tokenizer, EngineConfig(kv_cache_tokens=256, cuda_graph_batch=2), torch.device("cpu"), Metrics(), lora
    )
    static = engine.runner.static

    def decoding(**changes) -> ScheduledChunk:
        params = SamplingParams(max_tokens=4, prompt_logprobs=changes.pop("prompt_logprobs", None))
        r = Request("r", [1, 2, 3], params, output_ids=[4], num_computed=3, **changes)
        return ScheduledChunk.next_for(r, 1)

    plain = decoding()
    assert static.fits([plain]) and static.fits([plain, decoding(slots=[0], adapters=((AdapterKey("a", 1), 1.0),))])
    assert not static.fits([plain] * 3)  # more than the largest size
    assert not static.fits([ScheduledChunk.next_for(Request("p", [1, 2, 3], SamplingParams(max_tokens=4)), 3)])
    assert not static.fits([decoding(prompt_logprobs=1)])
    mix = ((AdapterKey("a", 1), 0.5), (AdapterKey("b", 1), 0.5))
    assert not static.fits([decoding(slots=[0, 1], adapters=mix)])
