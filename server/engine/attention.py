"""Paged attention for a flattened batch, plugged into transformers' own model classes.

The model runs on `input_ids` of shape `[1, T]`: the new tokens of every scheduled sequence,
one after another. transformers computes q/k/v and rotary embeddings per token from the
`position_ids` we pass, then calls the attention function registered here for each layer.
It writes the new keys and values into the paged pool and lets each sequence's queries
attend to its own cached tokens only.

Sequences are attended in groups, each one padded SDPA call: all decoding sequences (one
query each) share a group; a prefill chunk gets a group of its own, so one long prompt
never pads the decodes to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from plait.server.engine.kv_cache import PagedKVCache

ATTENTION_NAME = "plait_paged"


@dataclass(frozen=True)
class AttentionGroup:
    query_index: torch.Tensor  # [B, Q] positions in the flat batch (padding points at 0)
    kv_slots: torch.Tensor  # [B, L] flat pool slots of each sequence's context (padding: 0)
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend
    valid: torch.Tensor  # [n] positions in the flattened [B*Q] grid that hold real queries
    token_index: torch.Tensor  # [n] where those queries sit in the flat batch


@dataclass(frozen=True)
class AttentionBatch:
    """Everything every layer needs for one step, built once by the model runner."""

    kv_cache: PagedKVCache
    write_slots: torch.Tensor  # [T] pool slot for each new token's key and value
    groups: tuple[AttentionGroup, ...]


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
    prefills = [c for c in chunks if c.stop - c.start > 1]
    groups = [_group([c], kv_cache, device) for c in prefills]
    if decodes:
        groups.append(_group(decodes, kv_cache, device))
    return AttentionBatch(
        kv_cache=kv_cache,
        write_slots=torch.tensor(write_slots, dtype=torch.long, device=device),
        groups=tuple(groups),
    )


def _group(chunks: list[SequenceChunk], kv_cache: PagedKVCache, device) -> AttentionGroup:
    num_q = max(c.stop - c.start for c in chunks)
    num_kv = max(c.stop for c in chunks)
    query_index = torch.zeros(len(chunks), num_q, dtype=torch.long)
    kv_slots = torch.zeros(len(chunks), num_kv, dtype=torch.long)
    # Query j of a chunk sits at sequence position start + j and sees positions <= that.
    q_pos = torch.full((len(chunks), num_q), -1, dtype=torch.long)
    kv_len = torch.zeros(len(chunks), 1, dtype=torch.long)
    for b, c in enumerate(chunks):
        n = c.stop - c.start
        query_index[b, :n] = torch.arange(c.offset, c.offset + n)
        q_pos[b, :n] = torch.arange(c.start, c.stop)
        kv_slots[b, : c.stop] = torch.tensor(kv_cache.slots(c.block_ids, 0, c.stop))
        kv_len[b] = c.stop
    kv_pos = torch.arange(num_kv).view(1, 1, num_kv)
    mask = (kv_pos <= q_pos.unsqueeze(-1)) & (kv_pos < kv_len.unsqueeze(-1))
    # Padding queries attend to position 0 so softmax never sees an all-masked row; their
    # outputs are dropped.
    mask[:, :, 0] = True
    valid = (q_pos >= 0).flatten().nonzero().squeeze(1)
    return AttentionGroup(
        query_index=query_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask.unsqueeze(1).to(device),
        valid=valid.to(device),
        token_index=query_index.flatten()[valid.cpu()].to(device),
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
    for g in batch.groups:
        q = q_flat[g.query_index].transpose(1, 2)  # [B, H, Q, D]
        k = keys[g.kv_slots].transpose(1, 2).to(q.dtype)  # [B, KVH, L, D]
        v = values[g.kv_slots].transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=True)
        o = o.transpose(1, 2).flatten(0, 1)  # [B*Q, H, D]
        out[g.token_index] = o[g.valid]
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
