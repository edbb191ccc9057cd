"""Benchmark of the multi-adapter LoRA kernels (plait.kernels) on a CUDA GPU.

    python bench/bench_kernels.py [--dtype bfloat16] [--json results.json]   # on a machine with a CUDA GPU
    python bench/bench_kernels.py --smoke    # CPU, Triton interpreter, tiny shapes: checks the script only

Shapes are Llama-3-8B's (hidden 4096, 8 KV heads of 128, intermediate 14336): o_proj, the
fused q/k/v, the fused gate/up and down_proj.

For every shape it first checks the Triton result (and the padded variant's) against the
PyTorch reference, then times, side by side in this one run:

- triton: `add_lora` (one shrink and one expand launch for all adapters and slices);
- loop:   the per-adapter loop a naive implementation runs (gather rows, two matmuls,
          index_add, per distinct adapter);
- padded: the same Triton kernels with every adapter padded to the batch's largest rank,
          as vLLM does;

and the bytes-moved floor: the bytes the op must move at least (x rows, each distinct
adapter's A and B up to its own rank, y read and written once) at the device-to-device
copy bandwidth measured at the start. It prints achieved GB/s and percent of that floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from plait.kernels import LoRABatch, LoRAPool, add_lora, make_lora_batch

RANKS = (8, 16, 32, 64, 128)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Module:
    name: str
    in_features: int
    out_features: tuple[int, ...]


@dataclass(frozen=True)
class Shape:
    phase: str  # "decode" (one token per request) or "prefill"
    tokens: int
    adapters: int  # distinct adapters in the batch


GPU_MODULES = (
    Module("o_proj", 4096, (4096,)),
    Module("qkv_proj", 4096, (4096, 1024, 1024)),
    Module("gate_up", 4096, (14336, 14336)),
    Module("down_proj", 14336, (4096,)),
)
GPU_SHAPES = (
    *(
        Shape("decode", t, a)
        for t, a in ((1, 1), (16, 1), (16, 16), (64, 8), (64, 64), (256, 1), (256, 32), (256, 256))
    ),
    *(Shape("prefill", t, a) for t, a in ((1024, 1), (1024, 16), (4096, 64), (8192, 1), (8192, 1000))),
)
SMOKE_MODULES = (
    Module("o_proj", 64, (48,)),
    Module("qkv_proj", 64, (48, 16, 16)),
    Module("gate_up", 64, (80, 80)),
    Module("down_proj", 80, (64,)),
)
SMOKE_SHAPES = (Shape("decode", 1, 1), Shape("decode", 6, 3), Shape("prefill", 40, 4))


def build_pool(module: Module, num_slots: int, dtype: torch.dtype, device: str, rng: random.Random) -> LoRAPool:
    """num_slots adapters of mixed ranks, every slice targeted."""
    pool = LoRAPool.create(num_slots, module.in_features, module.out_features, max(RANKS), dtype=dtype, device=device)
    for slot in range(num_slots):
        r = rng.choice(RANKS)
        a = [
            torch.randn(r, module.in_features, device=device, dtype=dtype) / module.in_features**0.5
            for _ in module.out_features
        ]
        b = [torch.randn(out, r, device=device, dtype=dtype) / r**0.5 for out in module.out_features]
        # Scales near 1 keep the delta as large as the base output, so the check below sees
        # the delta's error rather than the rounding of y.
        pool.load(slot, a, b, [rng.uniform(0.5, 2.0) for _ in module.out_features])
    return pool


def segments(shape: Shape, rng: random.Random) -> tuple[list[int], list[int]]:
    """Decode: one token per request, adapters interleaved. Prefill: one segment per adapter."""
    if shape.phase == "decode":
        slots = [i % shape.adapters for i in range(shape.tokens)]
        rng.shuffle(slots)
        return [1] * shape.tokens, slots
    cuts = sorted(rng.sample(range(1, shape.tokens), shape.adapters - 1))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, shape.tokens], strict=True)]
    return lengths, list(range(shape.adapters))


def floor_bytes(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> int:
    ranks = pool.ranks.cpu()
    e = x.element_size()
    used = {slot for pairs in batch.groups for slot, _ in pairs}
    adapter = sum(
        int(ranks[s, slot]) * (pool.in_features + out) for slot in used for s, out in enumerate(pool.out_features)
    )
    return e * (batch.num_active * (pool.in_features + 2 * pool.total_out) + adapter)


def make_loop(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> Callable[[], None]:
    """The per-adapter loop, with its row lists prepared outside the timed call."""
    ranks, scales = pool.ranks.tolist(), pool.scales.tolist()
    r_max = pool.max_rank
    work = []
    for g, pairs in enumerate(batch.groups):
        ((slot, _),) = pairs
        rows = batch.token_index[batch.group_bounds[g] : batch.group_bounds[g + 1]].long()
        mats, col = [], 0
        for s, out in enumerate(pool.out_features):
            r = ranks[s][slot]
            mats.append((pool.a[slot, s * r_max : s * r_max + r], pool.b[slot, col : col + out, :r], scales[s][slot]))
            col += out
        work.append((rows, mats))

    def run() -> None:
        for rows, mats in work:
            xg = x[rows]
            y.index_add_(0, rows, torch.cat([(xg @ a.t()) @ b.t() * scale for a, b, scale in mats], dim=1))

    return run


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds per call: triton's do_bench on CUDA (it flushes L2 between runs), wall clock otherwise."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3

    def wall(fn: Callable[[], None]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1]

    return wall


def copy_bandwidth(device: str, measure: Callable[[Callable[[], None]], float]) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 30) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / measure(lambda: dst.copy_(src))


def check(name: str, y: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    delta = (want.float() - base.float()).abs().max().item()
    err = (y.float() - want.float()).abs().max().item() / max(delta, 1e-30)
    if not err <= TOLERANCE[y.dtype]:
        sys.exit(f"FAILED correctness: {name}: relative error {err:.3g} > {TOLERANCE[y.dtype]}")


def parse_args(doc: str) -> argparse.Namespace:
    """The options of the GPU benchmarks (this one and bench_attention.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the device, the bandwidth and every row here")
    return parser.parse_args()


def bench_device(smoke: bool, script: str) -> tuple[str, dict]:
    """Where a GPU benchmark runs, and what to record about it: the GPU, or under --smoke the CPU
    through the Triton interpreter."""
    if smoke:
        os.environ["PLAIT_TRITON_INTERPRET"] = "1"
        print("smoke run on the CPU through the Triton interpreter: timings are meaningless")
        return "cpu", {"device": "cpu (Triton interpreter; timings are meaningless)"}
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (none found); `--smoke` checks the script itself on the CPU")
    import triton

    props = torch.cuda.get_device_properties(0)
    machine = {
        "device": props.name,
        "memory_gib": round(props.total_memory / 2**30),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    print(f"device: {props.name}, {machine['memory_gib']} GiB, {props.multi_processor_count} SMs")
    print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
    return "cuda", machine


def timing(device: str) -> tuple[Callable[[Callable[[], None]], float], float]:
    """The timer for `device` and its copy bandwidth in bytes per second, printed."""
    measure = timer(device)
    bandwidth = copy_bandwidth(device, measure)
    print(f"copy bandwidth (device to device, read + write): {bandwidth / 1e9:.0f} GB/s\n")
    return measure, bandwidth


def write_results(args: argparse.Namespace, machine: dict, bandwidth: float, rows: list[dict]) -> None:
    if args.json:
        summary = {"dtype": args.dtype, "copy_bandwidth_gbps": bandwidth / 1e9, **machine, "rows": rows}
        args.json.write_text(json.dumps(summary, indent=1))


def main() -> None:
    args = parse_args(__doc__)
    dtype = getattr(torch, args.dtype)
    device, machine = bench_device(args.smoke, "bench_kernels.py")
    modules, shapes = (SMOKE_MODULES, SMOKE_SHAPES) if args.smoke else (GPU_MODULES, GPU_SHAPES)
    print(f"host: {platform.node()} ({platform.machine()}), dtype {args.dtype}, ranks mixed from {RANKS}")

    measure, bandwidth = timing(device)

    header = (
        f"{'module':<9} {'phase':<8} {'tokens':>6} {'adapters':>8} {'meta ms':>8} {'triton us':>10} "
        f"{'loop us':>10} {'padded us':>10} {'vs loop':>8} {'vs pad':>7} {'GB/s':>7} {'% floor':>8}"
    )
    print(header)
    print("-" * len(header))
    results = []  # (module, shape, loop / triton, % of floor)
    rows = []  # the same and more, for --json
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    for module in modules:
        pool = build_pool(module, max(s.adapters for s in shapes), dtype, device, rng)
        for shape in shapes:
            lengths, slots = segments(shape, rng)
            t0 = time.perf_counter()
            batch = make_lora_batch(lengths, slots, device=device)
            meta_ms = (time.perf_counter() - t0) * 1e3
            x = torch.randn(shape.tokens, module.in_features, device=device, dtype=dtype)
            base = torch.randn(shape.tokens, pool.total_out, device=device, dtype=dtype)
            used_max = int(pool.ranks[:, : shape.adapters].max())
            padded = dataclasses.replace(pool, ranks=torch.full_like(pool.ranks, used_max))

            want = base.clone()
            add_lora(want, x, pool, batch, backend="reference")
            name = f"{module.name} {shape}"
            for label, p, fn in (("triton", pool, add_lora), ("padded", padded, add_lora)):
                y = base.clone()
                fn(y, x, p, batch, backend="triton")
                check(f"{label} {name}", y, want, base)
            y = base.clone()
            make_loop(y, x, pool, batch)()
            check(f"loop {name}", y, want, base)

            y = base.clone()
            t_triton = measure(functools.partial(add_lora, y, x, pool, batch, backend="triton"))
            t_padded = measure(functools.partial(add_lora, y, x, padded, batch, backend="triton"))
            t_loop = measure(make_loop(y, x, pool, batch))
            moved = floor_bytes(x, pool, batch)
            results.append((module.name, shape, t_loop / t_triton, 100 * moved / bandwidth / t_triton))
            rows.append(
                {
                    "module": module.name,
                    **dataclasses.asdict(shape),
                    "meta_ms": meta_ms,
                    "triton_us": t_triton * 1e6,
                    "loop_us": t_loop * 1e6,
                    "padded_us": t_padded * 1e6,
                    "floor_bytes": moved,
                    "percent_of_floor": 100 * moved / bandwidth / t_triton,
                }
            )
            print(
                f"{module.name:<9} {shape.phase:<8} {shape.tokens:>6} {shape.adapters:>8} {meta_ms:>8.2f} "
                f"{t_triton * 1e6:>10.1f} {t_loop * 1e6:>10.1f} {t_padded * 1e6:>10.1f} "
                f"{t_loop / t_triton:>7.2f}x {t_padded / t_triton:>6.2f}x {moved / t_triton / 1e9:>7.0f} "
                f"{100 * moved / bandwidth / t_triton:>7.0f}%"
            )
    print(
        "\nvs loop / vs pad: how many times faster triton is. % floor: the bytes-moved floor time "
        "(bytes / copy bandwidth) over the triton time."
    )
    decode = sorted(r[3] for r in results if r[1].phase == "decode")
    worst = min(results, key=lambda r: r[2])
    print(
        f"decode shapes: median {decode[len(decode) // 2]:.0f}% of the floor (goal 80%); "
        f"slowest against the loop: {worst[2]:.2f}x at {worst[0]} {worst[1]} (goal >= 1)"
    )
    write_results(args, machine, bandwidth, rows)


if __name__ == "__main__":
    main()
