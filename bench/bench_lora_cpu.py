"""What LoRA costs a decode step on the CPU, inside the embedded model, side by side in one run.

    python bench/bench_lora_cpu.py [--steps 20] [--rounds 3] [--threads N]

The embedded SmolLM2-135M-Instruct (NF4) with the engine's LoRA layers on every linear
module and 8 device slots at max rank 64, holding adapters of ranks 8/16/32/64 on q/k/v/o
(the adapters of bench_adapters.py). One engine forward pass over 16 decode tokens (16
requests, 20 tokens of context each) is timed with no adapter and with the 16 tokens
spread over 1, 2, 4 and 8 distinct adapters. Rounds are interleaved and medians reported,
so load from other processes hits every case alike.

Read with it: the bytes a step moves. A decode step reads every weight of the base once
(about 100 MB for this model: NF4 layers and bf16 embeddings) and every weight of each
adapter in the batch once (7 MB for an average adapter here, in bf16), so with several
distinct adapters in a batch the step cannot cost much less than their share of those
bytes, whatever the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_adapters import RANKS, make_adapters  # this folder is on sys.path when run as a script
from bench_serving import machine

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.base_model import default_device, load_nf4_model, prepare_cpu_weights, resolve_model
from plait.server.engine.kv_cache import PagedKVCache
from plait.server.engine.lora import LoRALayers
from plait.server.engine.model_runner import ModelRunner
from plait.server.engine.request import Request, SamplingParams, ScheduledChunk

SLOTS, MAX_RANK, TOKENS, CONTEXT, BLOCK = 8, 64, 16, 20, 16
DISTINCT = (1, 2, 4, 8)


def requests(slots: list[int]) -> list[Request]:
    """One decode request per entry of `slots` (-1: no adapter), each with its own KV blocks."""
    out = []
    for i, slot in enumerate(slots):
        blocks = -(-CONTEXT // BLOCK)
        req = Request(
            f"r{i}",
            list(range(100, 100 + CONTEXT)),
            SamplingParams(max_tokens=1),
            num_computed=CONTEXT - 1,
            block_ids=list(range(i * blocks, (i + 1) * blocks)),
        )
        if slot >= 0:
            req.adapters, req.slots = ((f"slot-{slot}", 1.0),), [slot]
        out.append(req)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="forward passes per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads")

    device = default_device()
    model = load_nf4_model(resolve_model(None), device)
    prepare_cpu_weights(model)  # as the server does
    targets = base_lora_targets(model)
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv = PagedKVCache(
        mc.num_hidden_layers,
        TOKENS * -(-CONTEXT // BLOCK),
        BLOCK,
        mc.num_key_value_heads,
        head_dim,
        dtype=model.dtype,
        device=device,
    )
    layers = LoRALayers(model, targets, SLOTS, MAX_RANK, model.dtype, device)
    with tempfile.TemporaryDirectory() as work:
        for slot, name in enumerate(make_adapters(Path(work), SLOTS, targets, seed=0)):
            layers.load(slot, read_adapter(Path(work) / name, targets, MAX_RANK).modules)
    runner = ModelRunner(model, kv, device, layers)
    mb = (
        sum(
            r * (unit.pool.in_features + out) * unit.pool.a.element_size()
            for unit in layers.units
            for ranks, out in zip(unit.pool.ranks.tolist(), unit.pool.out_features, strict=True)
            for r in ranks
        )
        / SLOTS
        / 1e6
    )

    cases = {"no adapter": [-1] * TOKENS}
    for n in DISTINCT:  # slot i holds rank RANKS[i % 4]
        ranks = "/".join(str(RANKS[i % len(RANKS)]) for i in range(n))
        cases[f"{n} adapter{'s' * (n > 1)}, r {ranks}"] = [i % n for i in range(TOKENS)]

    def step_ms(slots: list[int]) -> float:
        batch = requests(slots)
        start = time.perf_counter()
        for _ in range(args.steps):
            runner.run([ScheduledChunk.next_for(r, 1) for r in batch])
        return (time.perf_counter() - start) / args.steps * 1e3

    times: dict[str, list[float]] = {label: [] for label in cases}
    for r in range(args.rounds + 1):  # the first round warms up
        for label, slots in cases.items():
            t = step_ms(slots)
            if r:
                times[label].append(t)

    print(
        f"\n{TOKENS} decode tokens per step, {CONTEXT} tokens of context each, {SLOTS} slots at max rank {MAX_RANK}, "
        f"{model.dtype} pools, median of {args.rounds} rounds x {args.steps} steps; an adapter averages "
        f"{mb:.1f} MB\n"
    )
    med = {label: statistics.median(v) for label, v in times.items()}
    print(f"{'batch':<34} {'step ms':>8} {'no adapter / this':>18}")
    for label in cases:
        print(f"{label:<34} {med[label]:>8.1f} {med['no adapter'] / med[label]:>18.2f}")
    print("\nno adapter / this: the throughput of a decode step relative to the bare base model.")


if __name__ == "__main__":
    main()
