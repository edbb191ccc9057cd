"""Triton kernels for the grouped LoRA shrink and expand.

One launch of each covers every group (adapter or adapter mix), every fused slice and
every rank:

- shrink, grid (group x pair x split-K x slice x rank-block, token-block):
  v[p, k, s, r] = w_k * scale[s, slot_k] * sum_i x[row_p, i] * A[slot_k, s, r, i].
  A program whose rank block starts past its slot's rank returns at once, so a rank-8
  adapter in a launch sized for rank 128 costs one block of work, not eight; the last,
  partial block is masked, so odd ranks (4, 12) read no padding rows either.
- expand, grid (group x slice x column-block, token-block):
  y[row_p, cols of s] += sum_k sum_{r < rank} v[p, k, s, r] * B[slot_k, col, r],
  looping over the rank only up to each slot's own rank. The K pairs of a multi-slot row
  are summed in registers and y is read and written once; K is a compile-time constant,
  so the common single-slot case compiles to the plain kernel.

Prefill and decode run the same kernels; `pick_config` chooses the tile shapes by the
batch shape (small token blocks and split-K for decode, where there are few rows to
spread over the GPU; larger blocks for prefill).

The functions below are plain Python until `_kernels` wraps them: `triton.jit` decides at
decoration time whether to interpret, so wrapping lazily lets one process run both the
compiled kernels (CUDA) and the interpreter (CPU tests) whatever the environment said
when this module was imported. For the same reason the kernels call no `tl` library
function that is itself a jit function (tl.cdiv, tl.sum, ...): under the interpreter those
would still be the compiled kind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .metadata import LoRABatch
from .pool import LoRAPool


def _shrink_kernel(
    x_ptr,
    a_ptr,
    v_ptr,
    ranks_ptr,
    scales_ptr,
    token_index_ptr,
    group_starts_ptr,
    group_slots_ptr,
    group_weights_ptr,
    in_features,
    i_chunk,
    num_slots,
    max_rank,
    n_slices,
    r_blocks,
    stride_xt,
    stride_xi,
    stride_as,
    stride_ar,
    stride_ai,
    stride_vp,
    stride_vk,
    stride_vs,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Rank blocks vary fastest, so the programs that share a tile of x run together and
    # all but the first find it in L2.
    pid_0 = tl.program_id(0)
    r_block = pid_0 % r_blocks
    slice_id = (pid_0 // r_blocks) % n_slices
    split = (pid_0 // (r_blocks * n_slices)) % SPLIT_K
    pair = pid_0 // (r_blocks * n_slices * SPLIT_K)  # group * K + k
    pid_m = tl.program_id(1)

    slot = tl.load(group_slots_ptr + pair)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    r0 = r_block * BLOCK_R
    if r0 >= rank:
        return
    group = pair // K
    end = tl.load(group_starts_ptr + group + 1)
    m0 = tl.load(group_starts_ptr + group) + pid_m * BLOCK_M
    if m0 >= end:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(token_index_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    x_rows = x_ptr + rows[:, None] * stride_xt
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + (slice_id * max_rank + offs_r)[None, :] * stride_ar

    i_lo = split * i_chunk
    i_hi = tl.minimum(i_lo + i_chunk, in_features)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for i0 in range(i_lo, i_hi, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_mask = offs_i < i_hi
        xt = tl.load(x_rows + offs_i[None, :] * stride_xi, mask=m_mask[:, None] & i_mask[None, :], other=0.0)
        at = tl.load(a_cols + offs_i[:, None] * stride_ai, mask=i_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=DOT_PRECISION)

    acc *= tl.load(group_weights_ptr + pair) * tl.load(scales_ptr + slice_id * num_slots + slot)
    v_ptrs = (
        v_ptr
        + offs_m[:, None].to(tl.int64) * stride_vp
        + (pair % K) * stride_vk
        + slice_id * stride_vs
        + offs_r[None, :]
    )
    mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(v_ptrs, acc, mask=mask)


def _expand_kernel(
    v_ptr,
    b_ptr,
    y_ptr,
    ranks_ptr,
    out_offsets_ptr,
    token_index_ptr,
    group_starts_ptr,
    group_slots_ptr,
    num_slots,
    n_slices,
    n_blocks,
    stride_vp,
    stride_vk,
    stride_vs,
    stride_bs,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_0 = tl.program_id(0)
    slice_id = (pid_0 // n_blocks) % n_slices
    group = pid_0 // (n_blocks * n_slices)
    n_end = tl.load(out_offsets_ptr + slice_id + 1)
    n0 = tl.load(out_offsets_ptr + slice_id) + (pid_0 % n_blocks) * BLOCK_N
    if n0 >= n_end:
        return
    end = tl.load(group_starts_ptr + group + 1)
    m0 = tl.load(group_starts_ptr + group) + tl.program_id(1) * BLOCK_M
    if m0 >= end:
        return
    # A slice the group's adapters do not target (rank 0) must not even touch y.
    total_rank = 0
    for k in tl.static_range(K):
        slot = tl.load(group_slots_ptr + group * K + k)
        total_rank += tl.where(slot >= 0, tl.load(ranks_ptr + slice_id * num_slots + tl.maximum(slot, 0)), 0)
    if total_rank == 0:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_end
    v_rows = v_ptr + offs_m[:, None].to(tl.int64) * stride_vp + slice_id * stride_vs
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in tl.static_range(K):
        slot = tl.load(group_slots_ptr + group * K + k)
        rank = tl.where(slot >= 0, tl.load(ranks_ptr + slice_id * num_slots + tl.maximum(slot, 0)), 0)
        b_cols = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            vt = tl.load(v_rows + k * stride_vk + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            bt = tl.load(b_cols + offs_r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            # v is float32; it meets B in B's dtype so 16-bit pools use the tensor cores.
            vt = vt.to(bt.dtype)
            if DOT_IN_FP32:
                vt = vt.to(tl.float32)
                bt = bt.to(tl.float32)
            acc += tl.dot(vt, bt, input_precision=DOT_PRECISION)

    rows = tl.load(token_index_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernels(interpret: bool) -> tuple[triton.runtime.KernelInterface, triton.runtime.KernelInterface]:
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_shrink_kernel), InterpretedFunction(_expand_kernel)
    return triton.jit(_shrink_kernel), triton.jit(_expand_kernel)


@dataclass(frozen=True)
class Config:
    """Tile shapes of one shrink/expand pair. Block sizes are powers of two >= 16 (tl.dot's minimum)."""

    block_m: int = 16
    shrink_block_r: int = 16
    shrink_block_i: int = 64
    split_k: int = 1
    expand_block_n: int = 64
    expand_block_r: int = 16
    num_warps: int = 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=256)
def _pick(
    max_group_len: int,
    groups: int,
    pairs: int,
    n_slices: int,
    max_rank: int,
    in_features: int,
    max_out: int,
    sms: int,
) -> Config:
    block_m = min(64, max(16, triton.next_power_of_2(max_group_len)))
    if sms == 0:  # interpreter: fewest, largest programs
        return Config(block_m=block_m, shrink_block_i=128)
    m_blocks = triton.cdiv(max_group_len, block_m)
    # Decode has too few (token-block, adapter) tiles to keep every SM streaming weights:
    # split the shrink's reduction over in_features, and narrow the expand's column
    # blocks, until there are a few programs per SM.
    enough = 4 * sms
    shrink_tiles = pairs * n_slices * triton.cdiv(max_rank, 16) * m_blocks
    split_k = 1
    while shrink_tiles * split_k < enough and in_features // (split_k * 2) >= 4 * 64:
        split_k *= 2
    block_n = 64
    while block_n > 16 and groups * n_slices * triton.cdiv(max_out, block_n) * m_blocks < enough:
        block_n //= 2
    return Config(block_m=block_m, split_k=split_k, shrink_block_i=64 if split_k > 1 else 128, expand_block_n=block_n)


def pick_config(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch, interpret: bool) -> Config:
    sms = 0 if interpret else _sm_count(x.device.index or 0)
    return _pick(
        batch.max_group_len,
        batch.num_groups,
        batch.num_groups * batch.slots_per_row,
        pool.n_slices,
        pool.max_rank,
        pool.in_features,
        max(pool.out_features),
        sms,
    )


def _dot_flags(dtype: torch.dtype, interpret: bool) -> dict[str, object]:
    # fp32 inputs get a true fp32 product (no TF32). The interpreter multiplies bf16
    # operands as raw integers (triton 3.x), so there they are widened first: exact, since
    # every bf16 value and product is representable in fp32.
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_IN_FP32": interpret and dtype == torch.bfloat16,
    }


def _m_blocks(batch: LoRABatch, config: Config) -> int:
    return triton.cdiv(batch.max_group_len, config.block_m)


def shrink(
    x: torch.Tensor, pool: LoRAPool, batch: LoRABatch, *, interpret: bool, config: Config | None = None
) -> torch.Tensor:
    """v [num_active, K, n_slices, max_rank] float32; entries past a slot's rank are unspecified."""
    config = config or pick_config(x, pool, batch, interpret)
    k = batch.slots_per_row
    shape = (batch.num_active, k, pool.n_slices, pool.max_rank)
    # Split-K programs add into v, so it starts at zero; otherwise every read entry is written.
    v = (torch.zeros if config.split_k > 1 else torch.empty)(shape, dtype=torch.float32, device=x.device)
    if batch.num_groups == 0:
        return v
    r_blocks = triton.cdiv(pool.max_rank, config.shrink_block_r)
    # Each split-K program reduces over one whole number of BLOCK_I tiles of in_features.
    i_chunk = triton.cdiv(triton.cdiv(pool.in_features, config.shrink_block_i), config.split_k)
    i_chunk *= config.shrink_block_i
    grid = (batch.num_groups * k * config.split_k * pool.n_slices * r_blocks, _m_blocks(batch, config))
    _kernels(interpret)[0][grid](
        x,
        pool.a,
        v,
        pool.ranks,
        pool.scales,
        batch.token_index,
        batch.group_starts,
        batch.group_slots,
        batch.group_weights,
        pool.in_features,
        i_chunk,
        pool.num_slots,
        pool.max_rank,
        pool.n_slices,
        r_blocks,
        x.stride(0),
        x.stride(1),
        pool.a.stride(0),
        pool.a.stride(1),
        pool.a.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        K=k,
        BLOCK_M=config.block_m,
        BLOCK_R=config.shrink_block_r,
        BLOCK_I=config.shrink_block_i,
        SPLIT_K=config.split_k,
        num_warps=config.num_warps,
        **_dot_flags(x.dtype, interpret),
    )
    return v


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    pool: LoRAPool,
    batch: LoRABatch,
    *,
    interpret: bool,
    config: Config | None = None,
) -> None:
    """y[rows] += v @ B^T per group, slot and slice, in place."""
    if batch.num_groups == 0:
        return
    config = config or pick_config(y, pool, batch, interpret)
    n_blocks = triton.cdiv(max(pool.out_features), config.expand_block_n)
    grid = (batch.num_groups * pool.n_slices * n_blocks, _m_blocks(batch, config))
    _kernels(interpret)[1][grid](
        v,
        pool.b,
        y,
        pool.ranks,
        pool.out_offsets,
        batch.token_index,
        batch.group_starts,
        batch.group_slots,
        pool.num_slots,
        pool.n_slices,
        n_blocks,
        v.stride(0),
        v.stride(1),
        v.stride(2),
        pool.b.stride(0),
        pool.b.stride(1),
        pool.b.stride(2),
        y.stride(0),
        y.stride(1),
        K=batch.slots_per_row,
        BLOCK_M=config.block_m,
        BLOCK_N=config.expand_block_n,
        BLOCK_R=config.expand_block_r,
        num_warps=config.num_warps,
        **_dot_flags(pool.b.dtype, interpret),
    )


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    pool: LoRAPool,
    batch: LoRABatch,
    *,
    interpret: bool,
    config: Config | None = None,
) -> None:
    config = config or pick_config(x, pool, batch, interpret)
    expand(
        y, shrink(x, pool, batch, interpret=interpret, config=config), pool, batch, interpret=interpret, config=config
    )
