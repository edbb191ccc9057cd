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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from plait.kernels import BlockTables, make_block_tables, paged_decode_attention
from plait.server.engine.kv_cache import PagedKVCache

ATTENTION_NAME = "plait_paged"


@dataclass(frozen=True)
class PrefillChunk:
    """Several new tokens of one sequence, at rows [offset, offset + n) of the flat batch."""

    offset: int
    kv_slots: torch.Tensor  # [L] pool slots of the sequence's first L tokens, the new ones included
    mask: torch.Tensor  # [n, L] True where a new token may attend


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
    # New token j sits at sequence position start + j and sees positions <= that.
    q_pos = torch.arange(c.start, c.stop).unsqueeze(1)
    mask = torch.arange(c.stop).unsqueeze(0) <= q_pos
    return PrefillChunk(
        offset=c.offset,
        kv_slots=torch.tensor(kv_cache.slots(c.block_ids, 0, c.stop), dtype=torch.long).to(device),
        mask=mask.to(device),
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
    plait_attention: AttentionBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
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
        rows = slice(p.offset, p.offset + p.mask.shape[0])
        q = q_flat[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        k = keys[p.kv_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, L, D]
        v = values[p.kv_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=p.mask, scale=scaling, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    if batch.decodes is not None:
        d = batch.decodes
        q = q_flat[d.rows].to(keys.dtype)
        out[d.rows] = paged_decode_attention(q, keys, values, d.tables, scale=scaling).to(out.dtype)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
