"""The public ops: check the arguments once, then run Triton or the PyTorch reference.

Backend "auto" runs the Triton kernels on CUDA tensors, the Triton interpreter when
`PLAIT_TRITON_INTERPRET=1` or `TRITON_INTERPRET=1` is set (tests), and the PyTorch
reference otherwise (CPU serving). Triton is imported only when it is used, so the CPU
path works on machines without it.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from . import attention_reference, reference
from .block_tables import BlockTables
from .metadata import LoRABatch
from .pool import LoRAPool

Backend = Literal["auto", "triton", "reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpret_requested() -> bool:
    """Whether the environment asks for the Triton interpreter."""
    return any(os.environ.get(name, "0") == "1" for name in ("PLAIT_TRITON_INTERPRET", "TRITON_INTERPRET"))


def _use_triton(t: torch.Tensor, backend: Backend) -> bool:
    if backend == "auto":
        return t.is_cuda or interpret_requested()
    if backend in ("triton", "reference"):
        return backend == "triton"
    raise ValueError(f"unknown backend {backend!r}")


def _interpret(t: torch.Tensor) -> bool:
    # Compiled Triton needs a GPU; on any other device the interpreter is the only way to run it.
    return not t.is_cuda or interpret_requested()


def _check_x(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    if x.dtype not in _DTYPES or x.dtype != pool.a.dtype:
        raise TypeError(f"x is {x.dtype} and the pool {pool.a.dtype}; both must be one of fp16, bf16, fp32")
    if x.ndim != 2 or x.shape[1] != pool.in_features or x.shape[0] < batch.num_tokens:
        raise ValueError(f"x must be [>= {batch.num_tokens}, {pool.in_features}], got {tuple(x.shape)}")
    if x.device != pool.a.device or x.device != batch.device:
        raise ValueError(f"x on {x.device}, pool on {pool.a.device}, batch on {batch.device}")


def _check_y(y: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    if y.dtype != pool.b.dtype:
        raise TypeError(f"y is {y.dtype} but the pool is {pool.b.dtype}")
    if y.ndim != 2 or y.shape[1] != pool.total_out or y.shape[0] < batch.num_tokens:
        raise ValueError(f"y must be [>= {batch.num_tokens}, {pool.total_out}], got {tuple(y.shape)}")
    if y.device != pool.b.device or y.device != batch.device:
        raise ValueError(f"y on {y.device}, pool on {pool.b.device}, batch on {batch.device}")


def _check_v(v: torch.Tensor, pool: LoRAPool, batch: LoRABatch) -> None:
    shape = (batch.num_active, batch.slots_per_row, pool.n_slices, pool.max_rank)
    if v.dtype != torch.float32 or tuple(v.shape) != shape or v.stride(3) != 1:
        raise ValueError(f"v must be float32 {shape} with unit stride on the rank axis")


def lora_shrink(x: torch.Tensor, pool: LoRAPool, batch: LoRABatch, *, backend: Backend = "auto") -> torch.Tensor:
    """Scaled low-rank activations v [num_active, K, n_slices, max_rank], float32.

    Row p of v is token `batch.token_index[p]`; v[p, k, s, :r] = w_k * scale[s, slot_k] *
    x[row] @ A[slot_k, slice s, :r]^T with r that slot's rank in slice s. Entries past r
    are unspecified (zero from the reference).
    """
    _check_x(x, pool, batch)
    if _use_triton(x, backend):
        from . import triton_ops

        return triton_ops.shrink(x, pool, batch, interpret=_interpret(x))
    return reference.shrink(x, pool, batch)


def lora_expand(
    y: torch.Tensor, v: torch.Tensor, pool: LoRAPool, batch: LoRABatch, *, backend: Backend = "auto"
) -> None:
    """y[row, slice s] += sum_k v[p, k, s, :r] @ B[slot_k, slice s, :r]^T, in place."""
    _check_y(y, pool, batch)
    _check_v(v, pool, batch)
    if _use_triton(y, backend):
        from . import triton_ops

        triton_ops.expand(y, v, pool, batch, interpret=_interpret(y))
    else:
        reference.expand(y, v, pool, batch)


def add_lora(y: torch.Tensor, x: torch.Tensor, pool: LoRAPool, batch: LoRABatch, *, backend: Backend = "auto") -> None:
    """Add every token's LoRA delta into y in place: for each (slot, weight) of its row,
    y[t] += weight * scale * (x[t] @ A[slot]^T) @ B[slot]^T, per slice of a fused pool.

    x is [T, in_features] and y [T, sum(out_features)], any strides, same dtype as the pool
    (fp16, bf16 or fp32; arithmetic is fp32). Rows with no adapter are not touched.
    """
    _check_x(x, pool, batch)
    _check_y(y, pool, batch)
    if batch.num_groups == 0:
        return
    if _use_triton(x, backend):
        from . import triton_ops

        triton_ops.add_lora(y, x, pool, batch, interpret=_interpret(x))
    else:
        reference.add_lora(y, x, pool, batch)


def _check_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: BlockTables) -> None:
    if q.dtype not in _DTYPES or keys.dtype != q.dtype or values.dtype != q.dtype:
        raise TypeError(
            f"q, keys and values must share one of fp16, bf16, fp32; got {q.dtype}, {keys.dtype}, {values.dtype}"
        )
    if q.ndim != 3 or keys.ndim != 3 or keys.shape != values.shape or keys.shape[2] != q.shape[2]:
        raise ValueError(
            f"q must be [B, H, D] and keys, values [slots, KVH, D]; got {tuple(q.shape)}, {tuple(keys.shape)}"
        )
    if q.shape[1] % keys.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {keys.shape[1]} KV heads evenly")
    if q.shape[0] != tables.num_seqs:
        raise ValueError(f"{q.shape[0]} queries but block tables for {tables.num_seqs} sequences")
    if any(t.stride(-1) != 1 for t in (q, keys, values)):
        raise ValueError("q, keys and values need unit stride on the head dimension")
    if not (q.device == keys.device == values.device == tables.device):
        raise ValueError(
            f"q on {q.device}, keys on {keys.device}, values on {values.device}, tables on {tables.device}"
        )


def paged_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: BlockTables,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one new query per sequence over that sequence's tokens in a paged pool.

    q is [B, H, D]; keys and values are one layer's pool, [slots, KVH, D] with H a multiple
    of KVH (grouped-query attention); `tables` says which slots are sequence b's first
    lengths[b] tokens. Returns out [B, H, D] in q's dtype, softmax(s) V with the softmax in
    fp32, where s = scale · q Kᵀ (scale defaults to 1/√D), or softcap · tanh(s / softcap) with
    Gemma 2's soft-capping. With a sliding `window`, each query attends to the last `window`
    tokens of its sequence only (transformers' convention: itself and window - 1 before it).
    """
    _check_attention(q, keys, values, tables)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, not {softcap}")
    scale = q.shape[2] ** -0.5 if scale is None else scale
    if _use_triton(q, backend):
        from . import triton_attention

        return triton_attention.decode_attention(
            q, keys, values, tables, scale, window, softcap, interpret=_interpret(q)
        )
    return attention_reference.decode_attention(q, keys, values, tables, scale, window, softcap)
