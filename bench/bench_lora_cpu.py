"""The CPU LoRA path: the old per-(group, slot, slice) loop against the batched tiles, side by side.

    python bench/bench_lora_cpu.py [--calls 100] [--rounds 5] [--threads N]
    python bench/bench_lora_cpu.py --sweep      # fixed tile shapes against the cost model's pick

Shapes of the embedded SmolLM2-135M (hidden 576, 30 layers): q/o 576->576, k/v 576->192,
each a plain (one-slice) pool of 8 device slots (16 for the 16-adapter case) at max rank 64
in bf16, as the engine builds them on CPU, holding adapters of ranks 8/16/32/64 on q/k/v/o
only; gate/up/down (576->1536, 1536->576) are wrapped like every target layer of the engine
but no adapter targets them. Batches: 16 decode tokens over 1, 8 and 16 adapters (Zipf,
s=1), and a 256-token prefill (a rank-64 adapter) plus 15 decode tokens over 8 adapters.

Each call is add_lora on the whole batch with the weights hot in cache (in a forward pass
they are not, so expect more there); old and new run in alternating rounds of --calls
calls and the median round counts, so load from other processes hits both alike (on a
busy machine, --threads 1 keeps OpenMP waits out of the figures and times CPU time, not wall
time). Per step is one call per module for 30 layers: 210 calls, as in the engine.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import statistics
import time
from collections.abc import Callable

import torch
from bench_serving import machine  # this folder is on sys.path when run as a script

from plait.kernels import LoRABatch, LoRAPool, add_lora, make_lora_batch, reference

HIDDEN, INTERMEDIATE, LAYERS, MAX_RANK = 576, 1536, 30, 64
RANKS = (8, 16, 32, 64)
MODULES = {  # name -> (in, out)
    "q_proj": (HIDDEN, 576),
    "k_proj": (HIDDEN, 192),
    "v_proj": (HIDDEN, 192),
    "o_proj": (HIDDEN, 576),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
TARGETED = ("q_proj", "k_proj", "v_proj", "o_proj")


def old_add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """The CPU path before the tiles (kernels/reference.py until then), verbatim but merged."""
    r_max = pool.max_rank
    v = torch.zeros(batch.num_active, batch.slots_per_row, pool.n_slices, r_max, dtype=torch.float32, device=x.device)
    if batch.num_active == 0:
        return
    ranks, scales = pool.ranks.tolist(), pool.scales.tolist()
    rows = batch.token_index.long()
    for g, pairs in enumerate(batch.groups):
        lo, hi = batch.group_bounds[g], batch.group_bounds[g + 1]
        xg = x[rows[lo:hi]].float()
        for k, (slot, weight) in enumerate(pairs):
            for s in range(pool.n_slices):
                r = ranks[s][slot]
                if r:
                    a = pool.a[slot, s * r_max : s * r_max + r].float()
                    v[lo:hi, k, s, :r] = torch.mm(xg, a.t()).mul_(weight * scales[s][slot])
    offsets = [0]
    for width in pool.out_features:
        offsets.append(offsets[-1] + width)
    delta = torch.zeros(batch.num_active, pool.total_out, dtype=torch.float32, device=y.device)
    for g, pairs in enumerate(batch.groups):
        lo, hi = batch.group_bounds[g], batch.group_bounds[g + 1]
        for k, (slot, _) in enumerate(pairs):
            for s in range(pool.n_slices):
                r = ranks[s][slot]
                if r:
                    b = pool.b[slot, offsets[s] : offsets[s + 1], :r].float()
                    delta[lo:hi, offsets[s] : offsets[s + 1]].addmm_(v[lo:hi, k, s, :r], b.t())
    y[rows] = (y[rows].float() + delta).to(y.dtype)


def build_pool(name: str, fan_in: int, out: int, num_slots: int, rng: torch.Generator) -> LoRAPool:
    pool = LoRAPool.create(num_slots, fan_in, out, MAX_RANK, dtype=torch.bfloat16)
    for slot in range(num_slots):
        if name in TARGETED:
            r = RANKS[slot % len(RANKS)]
            a = (torch.randn(r, fan_in, generator=rng) / fan_in**0.5).bfloat16()
            b = (torch.randn(out, r, generator=rng) * 0.01).bfloat16()
            pool.load(slot, [a], [b], [2.0])
        else:
            pool.clear(slot)
    return pool


def zipf_slots(n_tokens: int, n_adapters: int, rng: random.Random) -> list[int]:
    return rng.choices(range(n_adapters), weights=[1 / (i + 1) for i in range(n_adapters)], k=n_tokens)


def batches(rng: random.Random) -> list[tuple[str, int, list[int], list[int]]]:
    """(label, slots in the pool, segment lengths, segment slots)."""
    out = []
    for n in (1, 8, 16):
        slots = zipf_slots(16, n, rng)
        if n > 1:  # every adapter of the case in the batch at least once
            slots[:n] = range(n)
        rng.shuffle(slots)
        out.append((f"decode 16 tok, {n} adapters", max(8, n), [1] * 16, slots))
    out.append(("prefill 256 + 15 decode, 8 adapters", 8, [256] + [1] * 15, [3, *zipf_slots(15, 8, rng)]))
    return out


def timed_rounds(fns: dict[str, Callable[[], None]], calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, rounds interleaved: CPU time with one thread (steadier
    on a busy machine), wall time otherwise."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm up
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(calls):
                fn()
            times[name].append((clock() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def sweep(pools: dict, cases: list, calls: int, rounds: int) -> None:
    """Time every fixed (tile length, rank block width) against the cost model's pick: how to retune
    reference.X_COST / MAC_COST on another machine."""
    choose = reference._choose
    print(f"{'batch':<36} {'module':<8} {'model pick':>12} {'us':>7}   best fixed (length, width): us")
    for label, num_slots, lengths, slots in cases:
        for name in ("q_proj", "k_proj"):
            pool = pools[num_slots][name]
            x = torch.randn(sum(lengths), pool.in_features).bfloat16()
            y = torch.randn(sum(lengths), pool.total_out).bfloat16()
            picked = reference._plan_for(make_lora_batch(lengths, slots), pool)
            fns = {}
            for shape in itertools.product((1, 2, 4, 8, 16, 32, 64), (16, 32, 64)):
                batch = make_lora_batch(lengths, slots)
                reference._choose = lambda work, pool, shape=shape: shape
                reference._plan_for(batch, pool)  # made now, with this shape
                fns[shape] = functools.partial(add_lora, y, x, pool, batch)
            reference._choose = choose
            batch = make_lora_batch(lengths, slots)
            fns["model"] = functools.partial(add_lora, y, x, pool, batch)
            t = timed_rounds(fns, calls, rounds)
            best = sorted((v, k) for k, v in t.items() if k != "model")[:3]
            print(f"{label:<36} {name:<8} {str((picked.length, picked.width)):>12} {t['model'] * 1e6:>7.1f}   "
                  + ", ".join(f"{k}: {v * 1e6:.1f}" for v, k in best))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true", help="time fixed tile shapes against the cost model's pick")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads")
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    pools = {n: {name: build_pool(name, *shape, n, gen) for name, shape in MODULES.items()} for n in (8, 16)}
    cases = batches(rng)
    if args.sweep:
        sweep(pools, cases, args.calls, args.rounds)
        return
    print(f"add_lora per call, median of {args.rounds} rounds x {args.calls} calls; bf16 pools, max rank {MAX_RANK}\n")
    header = f"{'batch':<36} {'module':<10} {'old us':>9} {'new us':>9} {'old/new':>8}"
    print(header)
    print("-" * len(header))
    for label, num_slots, lengths, slots in cases:
        batch = make_lora_batch(lengths, slots)
        step = {"old": 0.0, "new": 0.0}
        for name, pool in pools[num_slots].items():
            x = torch.randn(sum(lengths), pool.in_features).bfloat16()
            base = torch.randn(sum(lengths), pool.total_out).bfloat16()
            y_old, y_new = base.clone(), base.clone()
            old_add_lora(y_old, x, pool, batch)
            add_lora(y_new, x, pool, batch)
            delta = (y_old.float() - base.float()).abs().max().item()
            err = (y_new.float() - y_old.float()).abs().max().item()
            assert err <= 0.02 * max(delta, 1e-6), f"{label} {name}: old and new differ by {err} (delta {delta})"
            y = base.clone()
            fns = {"old": functools.partial(old_add_lora, y, x, pool, batch),
                   "new": functools.partial(add_lora, y, x, pool, batch)}  # fmt: skip
            t = timed_rounds(fns, args.calls, args.rounds)
            for k in step:
                step[k] += t[k] * LAYERS
            print(f"{label:<36} {name:<10} {t['old'] * 1e6:>9.1f} {t['new'] * 1e6:>9.1f} {t['old'] / t['new']:>7.1f}x")
        plan = reference._plan_for(batch, pools[num_slots]["q_proj"])
        print(f"{label:<36} {'per step':<10} {step['old'] * 1e3:>7.2f}ms {step['new'] * 1e3:>7.2f}ms "
              f"{step['old'] / step['new']:>7.1f}x   (q/o plan: tiles of {plan.length} rows, rank blocks of "
              f"{plan.width}, {plan.num_blocks} blocks)\n")  # fmt: skip
    print("per step: one call per module for 30 layers (210 calls), the LoRA cost of one forward pass.")


if __name__ == "__main__":
    main()
