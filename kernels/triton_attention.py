"""Triton kernel for paged decode attention: one query per sequence against its cached tokens.

Grid (sequence, query head). A program walks its sequence's block table one pool block at a
time, up to the sequence's length, and keeps an online softmax (running maximum, running
sum, running weighted sum of values) in fp32 registers, so keys and values are read straight
from the pool, once, and nothing is padded to the longest sequence. With grouped-query
attention the programs of the query heads that share a KV head read the same blocks; the
later ones find them in L2.

As in `triton_ops`, the kernel is plain Python until `_kernel` wraps it (compiled or
interpreted), and it calls no `tl` function that is itself a jit function: reductions go
through `tl.reduce` with the combine functions below, which both modes accept.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .block_tables import BlockTables


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    lengths_ptr,
    scale,
    window,
    softcap,
    group_size,
    head_dim,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_tb,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group_size
    length = tl.load(lengths_ptr + seq)
    first = tl.maximum(length - window, 0)  # the first position attended to

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + head * stride_qh + offs_d, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale
    offs_t = tl.arange(0, BLOCK_T)
    k_base = k_ptr + kv_head * stride_kh + offs_d[None, :]
    v_base = v_ptr + kv_head * stride_vh + offs_d[None, :]

    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    for j in range(first // BLOCK_SIZE, (length + BLOCK_SIZE - 1) // BLOCK_SIZE):
        block = tl.load(tables_ptr + seq.to(tl.int64) * stride_tb + j).to(tl.int64)
        pos = j * BLOCK_SIZE + offs_t
        t_mask = (offs_t < BLOCK_SIZE) & (pos >= first) & (pos < length)
        slots = block * BLOCK_SIZE + offs_t
        mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slots[:, None] * stride_kt, mask=mask, other=0.0).to(tl.float32)
        scores = tl.reduce(q[None, :] * k, 1, _add)
        if USE_SOFTCAP:  # softcap · tanh(scores / softcap), tanh written with exp (no tl.tanh)
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        scores = tl.where(t_mask, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.reduce(scores, 0, _maximum))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max)
        v = tl.load(v_base + slots[:, None] * stride_vt, mask=mask, other=0.0).to(tl.float32)
        running_sum = running_sum * rescale + tl.reduce(p, 0, _add)
        acc = acc * rescale + tl.reduce(p[:, None] * v, 0, _add)
        running_max = new_max

    out = (acc / running_sum).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out, mask=d_mask)


@functools.cache
def _kernel(interpret: bool) -> triton.runtime.KernelInterface:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_decode_kernel)
    return triton.jit(_decode_kernel)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: BlockTables,
    scale: float,
    window: int | None,
    softcap: float | None,
    *,
    interpret: bool,
) -> torch.Tensor:
    """out [B, H, D] in q's dtype; see `plait.kernels.paged_decode_attention`."""
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    grid = (num_seqs, num_heads)
    _kernel(interpret)[grid](
        q,
        keys,
        values,
        out,
        tables.tables,
        tables.lengths,
        scale,
        window or 2**31 - 1,  # no window: every position
        softcap or 1.0,
        num_heads // keys.shape[1],
        head_dim,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        values.stride(0),
        values.stride(1),
        out.stride(0),
        out.stride(1),
        tables.tables.stride(0),
        BLOCK_SIZE=tables.block_size,
        BLOCK_T=triton.next_power_of_2(tables.block_size),
        BLOCK_D=triton.next_power_of_2(head_dim),
        USE_SOFTCAP=softcap is not None,
        num_warps=4 if head_dim * tables.block_size >= 4096 else 2,
    )
    return out
