"""The LoRA ops (plait.kernels) against a float64 computation and a plain loop.

Both backends are checked: the Triton kernels, run on the CPU through the Triton
interpreter (the "triton" backend on CPU tensors; see also
test_auto_backend_follows_the_environment), and the PyTorch path (the "reference"
backend, the CPU serving path). Each is compared with float64 and with `loop_add_lora`
below, a per-group loop that is obviously right. Every run draws fresh random inputs; the
seed is in each failure message and PLAIT_TEST_SEED replays it.

Poisoning: pool entries past each slot's rank are NaN (an op that reads them produces
NaN). x rows of tokens without an adapter are NaN, and y starts
random so a row an op forgot keeps its old value and misses the expected delta.

Error bound: max |y - y64| / max |delta64|, where y64 = y0 + delta64 is computed in float64
from the same (already rounded) inputs. The fp16/bf16 bounds cover the rounding of the
low-rank activations to the pool dtype before the expand product and the final rounding
of y; the fp32 one covers fp32 accumulation order.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import pytest
import torch

from plait.kernels import (
    LoRABatch,
    LoRAPool,
    add_lora,
    lora_expand,
    lora_shrink,
    make_lora_batch,
    make_row_lora_batch,
    triton_ops,
)
from plait.kernels import dispatch as kernel_dispatch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOLERANCE)
BACKENDS = ["triton", "reference"]


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("PLAIT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    return torch.Generator().manual_seed(seed)


@dataclass
class Case:
    """A pool filled with random adapters, and the same weights kept aside in float64."""

    pool: LoRAPool
    adapters: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]]  # slot -> per slice (A, B)
    scales: dict[int, list[float]]
    dtype: torch.dtype


def make_case(
    gen: torch.Generator,
    dtype: torch.dtype,
    slot_ranks: list[tuple[int, ...]],
    in_features: int = 48,
    out_features: tuple[int, ...] = (40,),
    max_rank: int = 128,
) -> Case:
    """slot_ranks[slot] = rank per slice (0: the adapter does not target that slice)."""
    pool = LoRAPool.create(len(slot_ranks), in_features, out_features, max_rank, dtype=dtype)
    pool.a.fill_(float("nan"))
    pool.b.fill_(float("nan"))
    adapters, scales = {}, {}
    for slot, ranks in enumerate(slot_ranks):
        per_slice, a_list, b_list = [], [], []
        for r, out in zip(ranks, out_features, strict=True):
            if r == 0:
                per_slice.append(None)
                a_list.append(None)
                b_list.append(None)
                continue
            a = (torch.randn(r, in_features, generator=gen) / in_features**0.5).to(dtype)
            b = (torch.randn(out, r, generator=gen) / r**0.5).to(dtype)
            per_slice.append((a.double(), b.double()))
            a_list.append(a)
            b_list.append(b)
        scales[slot] = (0.25 + 1.75 * torch.rand(len(ranks), generator=gen)).tolist()
        pool.load(slot, a_list, b_list, scales[slot])
        adapters[slot] = per_slice
    return Case(pool, adapters, scales, dtype)


def poison_past_rank(pool: LoRAPool) -> None:
    """NaN into every pool entry past a slot's rank: no op may read them."""
    ranks = pool.ranks.tolist()
    col = 0
    for s, out in enumerate(pool.out_features):
        for slot in range(pool.num_slots):
            r = ranks[s][slot]
            pool.a[slot, s * pool.max_rank + r : (s + 1) * pool.max_rank] = float("nan")
            pool.b[slot, col : col + out, r:] = float("nan")
        col += out


def loop_add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    """The oracle: one float32 matmul pair per (group, pair, slice), each cut to its slot's own rank."""
    ranks, scales, r_max = pool.ranks.tolist(), pool.scales.tolist(), pool.max_rank
    rows = batch.token_index.long()
    delta = torch.zeros(len(rows), pool.total_out, dtype=torch.float32)
    for g, pairs in enumerate(batch.groups):
        lo, hi = batch.group_bounds[g], batch.group_bounds[g + 1]
        xg = x[rows[lo:hi]].float()
        col = 0
        for s, out in enumerate(pool.out_features):
            for slot, weight in pairs:
                r = ranks[s][slot]
                a = pool.a[slot, s * r_max : s * r_max + r].float()
                b = pool.b[slot, col : col + out, :r].float()
                delta[lo:hi, col : col + out] += weight * scales[s][slot] * (xg @ a.t() @ b.t())
            col += out
    y[rows] = (y[rows].float() + delta).to(y.dtype)


def pairs_of(spec) -> list[tuple[int, float]]:
    if isinstance(spec, int):
        return [] if spec < 0 else [(spec, 1.0)]
    return [(s, w) for s, w in spec if s >= 0]


def expected_delta(case: Case, x: torch.Tensor, lengths, specs, order=None) -> torch.Tensor:
    """The delta in float64, token by token, straight from the definition."""
    outs = case.pool.out_features
    delta = torch.zeros(x.shape[0], sum(outs), dtype=torch.float64)
    rows = list(range(sum(lengths))) if order is None else list(order)
    pos = 0
    for length, spec in zip(lengths, specs, strict=True):
        for t in rows[pos : pos + length]:
            for slot, weight in pairs_of(spec):
                col = 0
                for s, out in enumerate(outs):
                    ab = case.adapters[slot][s]
                    if ab is not None:
                        a, b = ab
                        delta[t, col : col + out] += weight * case.scales[slot][s] * (b @ (a @ x[t].double()))
                    col += out
        pos += length
    return delta


def random_io(gen, case: Case, num_tokens: int, bare_rows) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(num_tokens, case.pool.in_features, generator=gen).to(case.dtype)
    x[list(bare_rows)] = float("nan")  # tokens with no adapter must never be read
    y0 = torch.randn(num_tokens, case.pool.total_out, generator=gen).to(case.dtype)
    return x, y0


def assert_close(y: torch.Tensor, y0: torch.Tensor, delta: torch.Tensor, dtype, gen, what="") -> None:
    want = y0.double() + delta
    err = ((y.double() - want).abs().max() / delta.abs().max()).item()
    assert err <= TOLERANCE[dtype], f"{what} {dtype}: relative error {err:.3g} (seed {gen.initial_seed()})"


def bare_rows_of(lengths, specs, order=None) -> list[int]:
    rows = list(range(sum(lengths))) if order is None else list(order)
    bare, pos = [], 0
    for length, spec in zip(lengths, specs, strict=True):
        if not pairs_of(spec):
            bare += rows[pos : pos + length]
        pos += length
    return bare


def run_and_check(gen, case, lengths, specs, backend, order=None, num_tokens=None):
    poison_past_rank(case.pool)
    batch = make_lora_batch(lengths, specs, token_order=order)
    num_tokens = num_tokens or sum(lengths)
    listed = set(range(sum(lengths)) if order is None else order)
    bare = bare_rows_of(lengths, specs, order) + [r for r in range(num_tokens) if r not in listed]
    x, y0 = random_io(gen, case, num_tokens, bare)
    y = y0.clone()
    add_lora(y, x, case.pool, batch, backend=backend)
    delta = expected_delta(case, x.nan_to_num(), lengths, specs, order)
    assert torch.equal(y[bare], y0[bare]), f"rows without an adapter changed (seed {gen.initial_seed()})"
    assert_close(y, y0, delta, case.dtype, gen, backend)
    y_loop = y0.clone()
    loop_add_lora(y_loop, x, case.pool, batch)
    assert_close(y, y0, y_loop.double() - y0.double(), case.dtype, gen, f"{backend} vs loop")


# One slice, ranks 4 to 128 in one pool, odd ones included; slot 5 is a second rank-4 adapter.
MIXED = [(4,), (8,), (12,), (16,), (32,), (4,), (64,), (128,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_mixed_ranks_empty_and_bare_segments(gen, dtype, backend):
    case = make_case(gen, dtype, MIXED)
    # A long segment over several token blocks, single-token ones, an empty one, bare ones,
    # and slot 1 twice (its two segments become one group).
    lengths = [70, 1, 0, 5, 3, 9, 2, 1, 4, 6]
    specs = [7, 2, 3, -1, 1, 0, 4, -1, 1, 6]
    run_and_check(gen, case, lengths, specs, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_one_token_per_row_interleaved_adapters(gen, dtype, backend):
    case = make_case(gen, dtype, MIXED)
    specs = [int(s) for s in torch.randint(-1, len(MIXED), (24,), generator=gen)]
    specs[0] = 7  # at least one adapter, whatever the draw
    run_and_check(gen, case, [1] * len(specs), specs, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_slot_weighted_rows(gen, dtype, backend):
    case = make_case(gen, dtype, MIXED)
    lengths = [3, 1, 4, 2, 5]
    specs = [
        [(0, 0.7), (7, 0.3)],
        [(2, -1.5), (4, 0.25), (6, 1.0)],  # K = 3, a negative weight
        5,  # a single-slot row in a K = 3 batch
        [(3, 0.5), (-1, 9.0)],  # slot -1 inside a list contributes nothing
        -1,
    ]
    run_and_check(gen, case, lengths, specs, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_slices_with_per_slice_ranks(gen, dtype, backend):
    # q/k/v-like slices of different widths (72 spans two column blocks); slot 1 does not
    # target the middle slice, slot 2 only the last one.
    ranks = [(8, 8, 8), (16, 0, 12), (0, 0, 4), (128, 64, 32)]
    case = make_case(gen, dtype, ranks, in_features=40, out_features=(72, 24, 16))
    lengths = [6, 1, 2, 3, 4]
    specs = [3, 0, [(1, 0.5), (2, 0.5)], 1, -1]
    run_and_check(gen, case, lengths, specs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_order_permutation(gen, backend):
    case = make_case(gen, torch.float32, MIXED)
    lengths, specs = [4, 3, 5, 2], [1, -1, 6, [(0, 0.5), (7, 2.0)]]
    order = torch.randperm(14, generator=gen).tolist()
    run_and_check(gen, case, lengths, specs, backend, order=order)
    # Rows missing from the order (here 14..17) are like bare rows.
    order = torch.randperm(18, generator=gen)[:14].tolist()
    run_and_check(gen, case, lengths, specs, backend, order=order, num_tokens=18)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_x_and_y_views(gen, backend):
    """x a column slice of a wider activation, y a column window of a wider output buffer."""
    case = make_case(gen, torch.float16, MIXED, in_features=200)  # 200: two reduction tiles
    poison_past_rank(case.pool)
    lengths, specs = [5, 2, 3], [7, -1, [(1, 1.0), (2, 1.0)]]
    batch = make_lora_batch(lengths, specs)
    x_wide = torch.randn(10, 256, generator=gen).half()
    x = x_wide[:, 16:216]
    out = torch.randn(10, 100, generator=gen).half()
    before = out.clone()
    y = out[:, 30:70]
    add_lora(y, x, case.pool, batch, backend=backend)
    assert torch.equal(out[:, :30], before[:, :30]) and torch.equal(out[:, 70:], before[:, 70:])
    assert_close(y, before[:, 30:70], expected_delta(case, x, lengths, specs), torch.float16, gen, backend)


@pytest.mark.parametrize("split_k", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_and_small_tiles(gen, dtype, split_k):
    """The decode configuration of a GPU (split reduction with atomic adds) under the interpreter."""
    case = make_case(gen, dtype, MIXED, in_features=200)
    poison_past_rank(case.pool)
    lengths, specs = [1, 1, 1, 2, 1], [7, 0, -1, [(2, 0.5), (6, 0.5)], 3]
    batch = make_lora_batch(lengths, specs)
    x, y0 = random_io(gen, case, 6, [2])
    y = y0.clone()
    config = triton_ops.Config(block_m=16, shrink_block_i=32, split_k=split_k, expand_block_n=16)
    triton_ops.add_lora(y, x, case.pool, batch, interpret=True, config=config)
    assert_close(y, y0, expected_delta(case, x.nan_to_num(), lengths, specs), dtype, gen, f"split_k={split_k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_then_expand_meet_the_contract_and_ignore_unused_entries(gen, dtype):
    case = make_case(gen, dtype, [*MIXED, (0,)])  # slot 8 targets nothing
    lengths, specs = [3, 1, 2, 2, 70], [[(7, 0.5), (0, 2.0)], 4, -1, 8, [(6, -1.0), (2, 0.5), (8, 1.0)]]
    batch = make_lora_batch(lengths, specs)
    x, y0 = random_io(gen, case, 78, [4, 5])
    # v from the definition, in float64; `valid` marks the entries the contract defines: k < len(pairs), r < rank.
    want = torch.zeros(batch.num_active, batch.slots_per_row, 1, case.pool.max_rank, dtype=torch.float64)
    valid = torch.zeros_like(want, dtype=torch.bool)
    rows = batch.token_index.long()
    for g, pairs in enumerate(batch.groups):
        lo, hi = batch.group_bounds[g], batch.group_bounds[g + 1]
        for k, (slot, weight) in enumerate(pairs):
            if case.adapters[slot][0] is not None:
                a, _ = case.adapters[slot][0]
                want[lo:hi, k, 0, : a.shape[0]] = weight * case.scales[slot][0] * (x[rows[lo:hi]].double() @ a.t())
                valid[lo:hi, k, 0, : a.shape[0]] = True
    poison_past_rank(case.pool)
    done = {}
    for backend in ("reference", "triton"):
        v = lora_shrink(x, case.pool, batch, backend=backend)
        assert v.shape == want.shape and v.dtype == torch.float32
        err = ((v.double() - want)[valid].abs().max() / want[valid].abs().max()).item()
        assert err <= TOLERANCE[torch.float32], f"{backend} shrink error {err:.3g} (seed {gen.initial_seed()})"
        if backend == "reference":
            assert not v[~valid].any(), "the PyTorch shrink leaves v zero past each rank"
        # Expand must not read v past a slot's rank or for padding pairs.
        y = y0.clone()
        lora_expand(y, v.masked_fill(~valid, float("nan")), case.pool, batch, backend=backend)
        assert_close(y, y0, expected_delta(case, x.nan_to_num(), lengths, specs), dtype, gen, backend)
        done[backend] = y
    assert_close(done["triton"], y0, done["reference"].double() - y0.double(), dtype, gen, "triton vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_without_adapters_leaves_y_alone(gen, backend):
    case = make_case(gen, torch.float32, MIXED)
    batch = make_lora_batch([3, 0, 2], [-1, 4, [(-1, 1.0)]])
    assert batch.num_groups == 0 and batch.num_active == 0
    x, y0 = random_io(gen, case, 5, range(5))
    y = y0.clone()
    add_lora(y, x, case.pool, batch, backend=backend)
    assert torch.equal(y, y0)
    assert lora_shrink(x, case.pool, batch, backend=backend).shape == (0, 1, 1, 128)


def test_cleared_slot_contributes_nothing(gen):
    case = make_case(gen, torch.float32, MIXED)
    case.pool.clear(3)
    batch = make_lora_batch([4], [3])
    x, y0 = random_io(gen, case, 4, [])
    for backend in BACKENDS:
        y = y0.clone()
        add_lora(y, x, case.pool, batch, backend=backend)
        assert torch.equal(y, y0)


def test_metadata_groups_segments_by_slot_list():
    batch = make_lora_batch(
        [2, 3, 0, 1, 2, 4],
        [5, -1, 2, [(1, 0.5), (5, 1.5)], 5, [(5, 1.5), (1, 0.25), (1, 0.25)]],
    )
    assert batch.num_tokens == 12
    # slot 5 (rows 0-1 and 6-7), then the 1+5 mix (rows 5 and 8-11); slot 2's segment is empty.
    assert batch.groups == (((5, 1.0),), ((1, 0.5), (5, 1.5)))
    assert batch.token_index.tolist() == [0, 1, 6, 7, 5, 8, 9, 10, 11]
    assert batch.group_starts.tolist() == [0, 4, 9] and batch.group_bounds == (0, 4, 9)
    assert batch.group_slots.tolist() == [[5, -1], [1, 5]]
    assert batch.group_weights.tolist() == [[1.0, 0.0], [0.5, 1.5]]
    assert batch.max_group_len == 5 and batch.slots_per_row == 2
    single = make_lora_batch([3, 1], [torch.tensor(0), 1])  # slot ids may be tensor or numpy integers
    assert single.slots_per_row == 1  # the single-slot kernels are compiled with K = 1
    assert single.groups == (((0, 1.0),), ((1, 1.0),)) and single.max_group_len == 3


def test_metadata_rejects_bad_input():
    with pytest.raises(ValueError):
        make_lora_batch([1, 2], [0])
    with pytest.raises(ValueError):
        make_lora_batch([-1], [0])
    with pytest.raises(ValueError):
        make_lora_batch([2], [0], token_order=[1, 1])


def test_checks_shapes_and_dtypes(gen):
    case = make_case(gen, torch.float16, [(8,)])
    batch = make_lora_batch([2], [0])
    x = torch.randn(2, 48).half()
    with pytest.raises(TypeError):
        add_lora(torch.zeros(2, 40), x.float(), case.pool, batch)
    with pytest.raises(ValueError):
        add_lora(torch.zeros(2, 41).half(), x, case.pool, batch)
    with pytest.raises(ValueError):
        add_lora(torch.zeros(1, 40).half(), x[:1], case.pool, batch)
    with pytest.raises(ValueError):
        case.pool.load(0, [torch.zeros(129, 48).half()], [torch.zeros(40, 129).half()], [1.0])
    with pytest.raises(ValueError):
        case.pool.load(0, [torch.zeros(8, 47).half()], [torch.zeros(40, 8).half()], [1.0])


@pytest.mark.parametrize("env", ["PLAIT_TRITON_INTERPRET", "TRITON_INTERPRET"])
def test_auto_backend_follows_the_environment(gen, monkeypatch, env):
    case = make_case(gen, torch.float32, MIXED)
    batch = make_lora_batch([2], [1])
    x, y0 = random_io(gen, case, 2, [])
    calls = []
    real = triton_ops.add_lora

    def spy(*args, **kwargs):
        calls.append(kwargs["interpret"])
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "add_lora", spy)
    for name in ("PLAIT_TRITON_INTERPRET", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    y = y0.clone()
    add_lora(y, x, case.pool, batch)  # CPU, no request: the PyTorch reference
    assert calls == [] and not kernel_dispatch.interpret_requested()
    monkeypatch.setenv(env, "1")
    y_triton = y0.clone()
    add_lora(y_triton, x, case.pool, batch)
    assert calls == [True]
    assert_close(y_triton, y0, expected_delta(case, x, [2], [1]), torch.float32, gen, "auto")


def test_pool_load_is_all_or_nothing_and_stale_weights_are_never_read(gen):
    pool = LoRAPool.create(3, 24, (20, 12), 16, dtype=torch.float32)
    pool.a.fill_(float("nan"))
    with pytest.raises(ValueError):  # a bad slice writes nothing, not even the good slices before it
        pool.load(2, [torch.ones(4, 24), torch.ones(4, 23)], [torch.ones(20, 4), torch.ones(12, 4)], [1.0, 1.0])
    assert pool.a[2].isnan().all() and pool.ranks[:, 2].tolist() == [0, 0]
    # A smaller adapter over a bigger one, untargeted slices and cleared slots: what lies past
    # each rank stays (NaN here) and is never read.
    case = make_case(
        gen, torch.float32, [(8, 0, 4), (16, 12, 0)], in_features=24, out_features=(20, 12, 8), max_rank=16
    )
    case.pool.load(0, [torch.randn(16, 24), None, None], [torch.randn(20, 16), None, None], [1.0, 1.0, 1.0])
    a, b = (torch.randn(5, 24, generator=gen), torch.randn(20, 5, generator=gen))
    case.pool.load(0, [a, None, None], [b, None, None], [0.5, 1.0, 1.0])
    case.adapters[0], case.scales[0] = [(a.double(), b.double()), None, None], [0.5, 1.0, 1.0]
    case.pool.a[0, 16:48] = float("nan")
    case.pool.b[0, 20:40] = float("nan")
    case.pool.clear(1)
    case.pool.a[1] = float("nan")
    for backend in BACKENDS:
        x, y0 = random_io(gen, case, 3, [])
        y = y0.clone()
        add_lora(y, x, case.pool, make_lora_batch([2, 1], [0, 1]), backend=backend)
        assert_close(y, y0, expected_delta(case, x, [2], [0]), torch.float32, gen, f"stale {backend}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_path_reads_a_slot_anew_after_each_load_or_clear(gen, dtype):
    """The PyTorch path keeps float32 copies of the slots it has used; a load or a clear after
    that use (another adapter, another rank, other scales) must be what the next call reads."""
    case = make_case(gen, dtype, [(16, 8), (4, 4)], in_features=24, out_features=(20, 12), max_rank=16)
    run_and_check(gen, case, [2, 3], [0, 1], "reference")
    a = [torch.randn(r, 24, generator=gen).to(dtype) for r in (5, 3)]
    b = [torch.randn(out, r, generator=gen).to(dtype) for out, r in ((20, 5), (12, 3))]
    case.pool.load(0, a, b, [0.5, 2.0])
    case.adapters[0] = [(a_s.double(), b_s.double()) for a_s, b_s in zip(a, b, strict=True)]
    case.scales[0] = [0.5, 2.0]
    run_and_check(gen, case, [2, 3], [0, 1], "reference")
    case.pool.clear(1)
    x, y0 = random_io(gen, case, 3, [])
    y = y0.clone()
    add_lora(y, x, case.pool, make_lora_batch([3], [1]), backend="reference")
    assert torch.equal(y, y0)


def random_batch(gen: torch.Generator, num_slots: int):
    """Segments mixing a prefill or two (some longer than a tile) with decode rows, bare and empty
    segments, and weighted multi-slot rows; sometimes a token order."""
    rng = random.Random(int(torch.randint(2**31, (1,), generator=gen)))
    lengths, specs = [], []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        lengths.append(rng.choice([0, rng.randint(2, 150)]) if kind < 0.2 else 1)
        if kind < 0.55:
            specs.append(rng.randrange(num_slots))
        elif kind < 0.7:
            specs.append(-1)
        else:
            specs.append([(rng.randrange(-1, num_slots), rng.uniform(-2, 2)) for _ in range(rng.randint(1, 3))])
    lengths[0], specs[0] = max(lengths[0], 1), 0  # at least one row with an adapter (slot 0 has ranks)
    total = sum(lengths)
    extra = rng.choice([0, 0, 3])
    order = rng.sample(range(total + extra), total) if rng.random() < 0.4 else None
    return lengths, specs, order, total + extra


@pytest.mark.parametrize("dtype", DTYPES)
def test_pytorch_path_on_random_batches(gen, dtype):
    """The PyTorch path on random batches: long prefills, decode rows, bare,
    empty and weighted multi-slot segments, fused and plain pools, ranks 4 to 64."""
    for _ in range(4):
        fused = bool(torch.randint(2, (1,), generator=gen))
        outs = (24, 16, 8) if fused else (40,)
        pick = [0, 4, 12, 16, 33, 64]  # 0: the adapter does not target that slice
        slot_ranks = [
            tuple(pick[int(i)] for i in torch.randint(len(pick), (len(outs),), generator=gen)) for _ in range(6)
        ]
        slot_ranks[0] = tuple(r or 8 for r in slot_ranks[0])
        case = make_case(gen, dtype, slot_ranks, in_features=36, out_features=outs, max_rank=64)
        lengths, specs, order, num_tokens = random_batch(gen, len(slot_ranks))
        run_and_check(gen, case, lengths, specs, "reference", order=order, num_tokens=num_tokens)


def test_weights_come_from_the_group_weights_tensor(gen):
    """A copy of the batch with other weights (say, a router's) uses them."""
    case = make_case(gen, torch.float32, MIXED)
    lengths, specs = [4, 1, 3], [[(1, 0.5), (6, 0.5)], 3, [(0, 1.0), (7, 2.0)]]
    batch = make_lora_batch(lengths, specs)
    x, y0 = random_io(gen, case, 8, [])
    add_lora(y0.clone(), x, case.pool, batch, backend="reference")
    routed = dataclasses.replace(batch, group_weights=torch.tensor([[-1.0, 0.25], [1.0, 0.0], [0.0, 3.0]]))
    y = y0.clone()
    add_lora(y, x, case.pool, routed, backend="reference")
    want = expected_delta(case, x, lengths, [[(1, -1.0), (6, 0.25)], 3, [(0, 0.0), (7, 3.0)]])
    assert_close(y, y0, want, torch.float32, gen, "routed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_batch_updated_in_place(gen, backend):
    """A fixed-shape batch of one row per group (a captured decode step's) applies whatever slots
    its buffer holds, bare rows included, like the same rows as one-token segments."""
    case = make_case(gen, torch.float32, MIXED)
    poison_past_rank(case.pool)
    buffer = torch.empty(6, dtype=torch.int32)
    for slots in ([3, -1, 0, 3, 7, -1], [-1, 2, 2, 5, -1, 1]):
        buffer.copy_(torch.tensor(slots))
        batch = make_row_lora_batch(buffer, slots)
        assert batch.group_slots.data_ptr() == buffer.data_ptr()
        bare = [i for i, s in enumerate(slots) if s < 0]
        x, y0 = random_io(gen, case, len(slots), bare)
        y = y0.clone()
        add_lora(y, x, case.pool, batch, backend=backend)
        assert torch.equal(y[bare], y0[bare])
        delta = expected_delta(case, x.nan_to_num(), [1] * len(slots), slots)
        assert_close(y, y0, delta, torch.float32, gen, backend)
