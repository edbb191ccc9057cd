"""Paged attention for a flattened batch, plugged into transformers' own model classes.

The model runs on `input_ids` of shape `[1, T]`: the new tokens of every scheduled sequence,
one after another. transformers computes q/k/v and rotary embeddings per token from the
`position_ids` we pass, then calls the attention function registered here for each layer.
It writes the new keys and values into the paged pool and lets each sequence's queries
attend to its own cached tokens only.

Sequences with one new token (decodes) are attended together by `plait.kernels`'
paged decode attention, which reads their blocks straight from the pool (a Triton kernel on
CUDA). A prefill chunk gets one SDPA call of its own over its gathered context, so one long
prompt never pads the decodes to its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from plait.kernels import BlockTables, make_block_tables, paged_decode_attention
from plait.server.engine.kv_cache import PagedKVCache

ATTENTION_NAME = "plait_paged"


@dataclass(frozen=True, eq=False)
class PrefillChunk:
    """New tokens of one sequence, at positions [start, L) of it and rows [offset, offset + L - start)
    of the flat batch."""

    offset: int
    start: int
    kv_slots: torch.Tensor  # [L] pool slots of the sequence's first L tokens, the new ones included
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_new(self) -> int:
        return self.kv_slots.shape[0] - self.start

    def mask(self, window: int | None) -> torch.Tensor:
        """bool [n, L]: True where a new token may attend: itself and the positions before it, or
        with a sliding window only the last `window` of those. Built once per step and window."""
        if window not in self._masks:
            device = self.kv_slots.device
            q_pos = torch.arange(self.start, self.kv_slots.shape[0], device=device).unsqueeze(1)
            k_pos = torch.arange(self.kv_slots.shape[0], device=device).unsqueeze(0)
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[window] = mask
        return self._masks[window]


@dataclass(frozen=True)
class Decodes:
    """The sequences with one new token each: their rows of the flat batch and their blocks."""

    rows: torch.Tensor  # [B]
    tables: BlockTables


@dataclass(frozen=True)
class AttentionBatch:
    """Everything every layer needs for one step, built once by the model runner."""

    kv_cache: PagedKVCache
    write_slots: torch.Tensor  # [T] pool slot for each new token's key and value
    prefills: tuple[PrefillChunk, ...]
    decodes: Decodes | None


@dataclass(frozen=True)
class SequenceChunk:
    """The new tokens of one sequence this step: positions [start, stop) of the sequence."""

    offset: int  # where its first new token sits in the flat batch
    start: int
    stop: int
    block_ids: list[int]


def build_attention_batch(chunks: list[SequenceChunk], kv_cache: PagedKVCache, device) -> AttentionBatch:
    write_slots: list[int] = []
    for c in chunks:
        write_slots += kv_cache.slots(c.block_ids, c.start, c.stop)
    decodes = [c for c in chunks if c.stop - c.start == 1]
    return AttentionBatch(
        kv_cache=kv_cache,
        write_slots=torch.tensor(write_slots, dtype=torch.long, device=device),
        prefills=tuple(_prefill(c, kv_cache, device) for c in chunks if c.stop - c.start > 1),
        decodes=_decodes(decodes, kv_cache, device) if decodes else None,
    )


def _prefill(c: SequenceChunk, kv_cache: PagedKVCache, device) -> PrefillChunk:
    return PrefillChunk(
        offset=c.offset,
        start=c.start,
        kv_slots=torch.tensor(kv_cache.slots(c.block_ids, 0, c.stop), dtype=torch.long).to(device),
    )


def _decodes(chunks: list[SequenceChunk], kv_cache: PagedKVCache, device) -> Decodes:
    return Decodes(
        rows=torch.tensor([c.offset for c in chunks], dtype=torch.long).to(device),
        tables=make_block_tables(
            [c.block_ids for c in chunks], [c.stop for c in chunks], kv_cache.block_size, device=device
        ),
    )


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    plait_attention: AttentionBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: sliding windows (Mistral, Qwen, Gemma, Phi-3) and
    soft-capped scores (Gemma 2) are honoured as the model's own attention would."""
    if plait_attention is None:
        raise RuntimeError("paged attention called without the step's AttentionBatch")
    batch = plait_attention
    layer = module.layer_idx
    keys, values = batch.kv_cache.keys[layer], batch.kv_cache.values[layer]
    keys.index_copy_(0, batch.write_slots, key[0].transpose(0, 1).to(keys.dtype))
    values.index_copy_(0, batch.write_slots, value[0].transpose(0, 1).to(values.dtype))

    q_flat = query[0].transpose(0, 1)  # [T, H, D]
    out = torch.empty_like(q_flat)
    for p in batch.prefills:
        rows = slice(p.offset, p.offset + p.num_new)
        q = q_flat[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        k = keys[p.kv_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, L, D]
        v = values[p.kv_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        out[rows] = _attend(q, k, v, p.mask(sliding_window), scaling, softcap)[0].transpose(0, 1)
    if batch.decodes is not None:
        d = batch.decodes
        q = q_flat[d.rows].to(keys.dtype)
        o = paged_decode_attention(q, keys, values, d.tables, scale=scaling, window=sliding_window, softcap=softcap)
        out[d.rows] = o.to(out.dtype)
    return out.unsqueeze(0), None


def _attend(q, k, v, mask, scale: float | None, softcap: float | None) -> torch.Tensor:
    """Attention of q [1, H, n, D] over k, v [1, KVH, L, D] where mask [n, L] allows."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # SDPA has no soft-capping; this is transformers' eager attention for Gemma 2.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)
    return weights.to(q.dtype) @ v


AttentionInterface.register(ATTENTION_NAME, paged_attention)
