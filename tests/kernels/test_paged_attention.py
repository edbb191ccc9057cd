"""Paged decode attention (plait.kernels.paged_decode_attention) on random ragged batches.

Both backends, the Triton kernel through the Triton interpreter on the CPU and the PyTorch
path (gather + SDPA, what the engine ran before the kernel), against a float64 loop that
attends over each sequence's tokens one by one, and against each other. Every run draws
fresh inputs; the seed is in each failure message and PLAIT_TEST_SEED replays it.

Sequences own random, scattered blocks of a shared pool, with lengths that end anywhere
inside a block. For the kernel, every pool slot no sequence may read is NaN, so reading
past a length or through a padding table entry shows up; the PyTorch path gathers padding
and masks it, so it gets a clean pool.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from plait.kernels import BlockTables, make_block_tables, paged_decode_attention

# max |out - out64| / max |v|
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("PLAIT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    return torch.Generator().manual_seed(seed)


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def ragged_case(gen, dtype, num_seqs, heads, kv_heads, head_dim, block_size, max_len):
    lengths = [randint(gen, 1, max_len) for _ in range(num_seqs)]
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3  # some blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_ids, taken = [], 0
    for n in needed:
        block_ids.append(order[taken : taken + n])
        taken += n
    keys = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    values = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype)
    return q, keys, values, make_block_tables(block_ids, lengths, block_size), block_ids, lengths


def attended(n: int, window: int | None) -> range:
    """The positions the query of a sequence of n tokens attends to."""
    return range(0 if window is None else max(n - window, 0), n)


def attention64(q, keys, values, block_ids, lengths, block_size, scale, window=None, softcap=None):
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // keys.shape[1]
    for b, (ids, n) in enumerate(zip(block_ids, lengths, strict=True)):
        slots = [ids[i // block_size] * block_size + i % block_size for i in attended(n, window)]
        k, v = keys[slots].double(), values[slots].double()  # [n, KVH, D]
        for h in range(q.shape[1]):
            scores = k[:, h // group] @ q[b, h].double() * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            out[b, h] = torch.softmax(scores, dim=0) @ v[:, h // group]
    return out


def poisoned(pool: torch.Tensor, block_ids, lengths, block_size, window=None) -> torch.Tensor:
    """The pool with every slot the sequences' queries may not read set to NaN."""
    readable = torch.zeros(pool.shape[0], dtype=torch.bool)
    for ids, n in zip(block_ids, lengths, strict=True):
        readable[[ids[i // block_size] * block_size + i % block_size for i in attended(n, window)]] = True
    out = pool.clone()
    out[~readable] = float("nan")
    return out


SHAPES = [  # (heads, kv heads, head dim, block size)
    (4, 4, 32, 16),  # multi-head
    (8, 2, 64, 16),  # grouped-query, as Llama-3
    (6, 1, 24, 4),  # multi-query, head dim not a power of two
    (3, 3, 16, 5),  # block size not a power of two
]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES)
def test_decode_attention_matches_float64(gen, dtype, heads, kv_heads, head_dim, block_size):
    q, keys, values, tables, block_ids, lengths = ragged_case(
        gen, dtype, randint(gen, 1, 6), heads, kv_heads, head_dim, block_size, max_len=50
    )
    scale = head_dim**-0.5
    expected = attention64(q, keys, values, block_ids, lengths, block_size, scale)
    bound = TOLERANCE[dtype] * values.abs().max().item()
    kernel = paged_decode_attention(
        q,
        poisoned(keys, block_ids, lengths, block_size),
        poisoned(values, block_ids, lengths, block_size),
        tables,
        backend="triton",
    )
    reference = paged_decode_attention(q, keys, values, tables, backend="reference")
    for name, out in (("triton", kernel), ("reference", reference)):
        assert out.dtype == dtype and out.shape == q.shape
        err = (out.double() - expected).abs().max().item()
        assert err <= bound, f"{name} {dtype}: error {err:.3g} > {bound:.3g} (seed {gen.initial_seed()})"
    err = (kernel.double() - reference.double()).abs().max().item()
    assert err <= 2 * bound, f"triton vs reference: {err:.3g} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("window", "softcap"), [(1, None), (7, None), (16, None), (1000, None), (None, 2.0), (9, 1.5)])
def test_sliding_windows_and_soft_capping_match_float64(gen, dtype, window, softcap):
    """Mistral's, Qwen's and Gemma's sliding windows (the last `window` tokens only) and Gemma
    2's soft-capped scores; for the kernel, the slots before a window are poisoned too."""
    q, keys, values, tables, block_ids, lengths = ragged_case(gen, dtype, 5, 8, 2, 32, 4, max_len=40)
    q = q * 4  # scores large enough for the cap to matter
    expected = attention64(q, keys, values, block_ids, lengths, 4, 32**-0.5, window, softcap)
    bound = TOLERANCE[dtype] * values.abs().max().item()
    kernel = paged_decode_attention(
        q,
        poisoned(keys, block_ids, lengths, 4, window),
        poisoned(values, block_ids, lengths, 4, window),
        tables,
        window=window,
        softcap=softcap,
        backend="triton",
    )
    reference = paged_decode_attention(q, keys, values, tables, window=window, softcap=softcap, backend="reference")
    for name, out in (("triton", kernel), ("reference", reference)):
        err = (out.double() - expected).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_strided_queries_and_one_token_sequences(gen, backend):
    block_size, heads, head_dim = 8, 4, 16
    q = torch.randn(3, 2 * heads, head_dim, generator=gen)[:, ::2]  # every other head: a strided view
    keys = torch.randn(4 * block_size, 2, head_dim, generator=gen)
    values = torch.randn(4 * block_size, 2, head_dim, generator=gen)
    block_ids, lengths = [[2], [0, 3], [1]], [1, 9, 8]
    out = paged_decode_attention(q, keys, values, make_block_tables(block_ids, lengths, block_size), backend=backend)
    expected = attention64(q, keys, values, block_ids, lengths, block_size, head_dim**-0.5)
    assert (out.double() - expected).abs().max() < 1e-5
    # A one-token sequence attends to its own value only (heads 0-1 share KV head 0, 2-3 head 1).
    torch.testing.assert_close(out[0], values[2 * block_size].repeat_interleave(2, dim=0))


def test_tables_can_be_wider_than_needed(gen):
    # A fixed-size table (a captured step's) holds more entries than a short sequence uses.
    q, keys, values, tables, block_ids, lengths = ragged_case(gen, torch.float32, 4, 4, 2, 16, 4, max_len=20)
    wide = BlockTables(
        torch.cat([tables.tables, torch.zeros(4, 5, dtype=torch.int32)], dim=1),
        tables.lengths,
        tables.block_size,
        (tables.tables.shape[1] + 5) * tables.block_size,
    )
    for backend in ("triton", "reference"):
        torch.testing.assert_close(
            paged_decode_attention(q, keys, values, wide, backend=backend),
            paged_decode_attention(q, keys, values, tables, backend="reference"),
        )


def test_bad_arguments_are_refused():
    tables = make_block_tables([[0]], [3], 4)
    q, pool = torch.randn(1, 4, 8), torch.randn(8, 2, 8)
    with pytest.raises(TypeError):
        paged_decode_attention(q.half(), pool, pool, tables)
    with pytest.raises(ValueError, match="evenly"):
        paged_decode_attention(torch.randn(1, 3, 8), pool, pool, tables)
    with pytest.raises(ValueError, match="sequences"):
        paged_decode_attention(torch.randn(2, 4, 8), pool, pool, tables)
    with pytest.raises(ValueError, match="window"):
        paged_decode_attention(q, pool, pool, tables, window=0)
    with pytest.raises(ValueError, match="softcap"):
        paged_decode_attention(q, pool, pool, tables, softcap=0.0)
    with pytest.raises(ValueError, match="fit"):
        make_block_tables([[0]], [5], 4)
    with pytest.raises(ValueError, match="fit"):
        make_block_tables([[0]], [0], 4)
