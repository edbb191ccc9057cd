"""Benchmark of paged decode attention (plait.kernels) on a CUDA GPU.

    python bench/bench_attention.py [--dtype bfloat16] [--json results.json]   # on a machine with a CUDA GPU
    python bench/bench_attention.py --smoke    # CPU, Triton interpreter, tiny shapes: checks the script only

One layer of Llama-3-8B's attention (32 query heads, 8 KV heads of 128) over a paged pool of
16-token blocks, each sequence's blocks scattered through the pool. For every shape (decoding
sequences x tokens of context, ragged: lengths drawn between half and all of the context) it
first checks the Triton kernel against the PyTorch path (gather into a padded tensor, then
SDPA), then times both side by side in this one run, with the bytes-moved floor: every
sequence's keys and values read once, at the device-to-device copy bandwidth measured at the
start.
"""

from __future__ import annotations

import functools
import random
import sys
from dataclasses import asdict, dataclass

import torch
from bench_kernels import (  # this folder is on sys.path when run as a script
    bench_device,
    parse_args,
    timing,
    write_results,
)

from plait.kernels import make_block_tables, paged_decode_attention

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
BLOCK = 16


@dataclass(frozen=True)
class Shape:
    sequences: int
    context: int  # the longest sequence's tokens; the others are drawn from [context / 2, context]


@dataclass(frozen=True)
class Heads:
    query: int
    kv: int
    dim: int


GPU_HEADS = Heads(32, 8, 128)
GPU_SHAPES = tuple(Shape(b, n) for b in (1, 16, 64, 256) for n in (512, 4096)) + (Shape(8, 32768),)
SMOKE_HEADS = Heads(4, 2, 16)
SMOKE_SHAPES = (Shape(1, 20), Shape(3, 50))


def ragged_batch(shape: Shape, rng: random.Random, device: str):
    """Lengths between half and all of the context, and each sequence's blocks scattered through a pool."""
    lengths = [rng.randint(max(1, shape.context // 2), shape.context) for _ in range(shape.sequences)]
    needed = [-(-n // BLOCK) for n in lengths]
    blocks = list(range(sum(needed)))
    rng.shuffle(blocks)
    starts = [sum(needed[:i]) for i in range(len(needed))]
    block_ids = [blocks[s : s + k] for s, k in zip(starts, needed, strict=True)]
    return make_block_tables(block_ids, lengths, BLOCK, device=device), sum(needed) * BLOCK, lengths


def main() -> None:
    args = parse_args(__doc__)
    dtype = getattr(torch, args.dtype)
    device, machine = bench_device(args.smoke, "bench_attention.py")
    heads, shapes = (SMOKE_HEADS, SMOKE_SHAPES) if args.smoke else (GPU_HEADS, GPU_SHAPES)
    print(f"{args.dtype}, heads {heads.query}/{heads.kv} x {heads.dim}, blocks of {BLOCK}")

    measure, bandwidth = timing(device)
    header = f"{'sequences':>9} {'context':>8} {'triton us':>10} {'pytorch us':>11} {'vs pytorch':>11} {'% floor':>8}"
    print(header)
    print("-" * len(header))
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    rows = []
    for shape in shapes:
        tables, slots, lengths = ragged_batch(shape, rng, device)
        q = torch.randn(shape.sequences, heads.query, heads.dim, device=device, dtype=dtype)
        keys = torch.randn(slots, heads.kv, heads.dim, device=device, dtype=dtype)
        values = torch.randn(slots, heads.kv, heads.dim, device=device, dtype=dtype)
        run = {
            backend: functools.partial(paged_decode_attention, q, keys, values, tables, backend=backend)
            for backend in ("triton", "reference")
        }
        want, got = run["reference"](), run["triton"]()
        err = ((got.float() - want.float()).abs().max() / values.float().abs().max()).item()
        if not err <= TOLERANCE[dtype]:
            sys.exit(f"FAILED correctness: {shape}: relative error {err:.3g} > {TOLERANCE[dtype]}")
        t_triton, t_torch = measure(run["triton"]), measure(run["reference"])
        moved = 2 * sum(lengths) * heads.kv * heads.dim * keys.element_size()
        floor = 100 * moved / bandwidth / t_triton
        rows.append(
            {**asdict(shape), "triton_us": t_triton * 1e6, "pytorch_us": t_torch * 1e6, "percent_of_floor": floor}
        )
        print(
            f"{shape.sequences:>9} {shape.context:>8} {t_triton * 1e6:>10.1f} {t_torch * 1e6:>11.1f} "
            f"{t_torch / t_triton:>10.2f}x {floor:>7.0f}%"
        )
    print("\nvs pytorch: how many times faster the kernel is. % floor: keys and values read once, over its time.")
    write_results(args, machine, bandwidth, rows)


if __name__ == "__main__":
    main()
