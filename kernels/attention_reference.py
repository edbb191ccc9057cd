"""Paged decode attention in plain PyTorch: the CPU path (and any device without Triton).

Gathers each sequence's keys and values from the pool into a padded `[B, KVH, max_length, D]`
tensor and runs SDPA over it with positions past each length masked. Simple and fast on a
CPU; on a GPU the gather moves every key twice and pads every sequence to the longest,
which is what the Triton kernel avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_tables import BlockTables


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: BlockTables, scale: float
) -> torch.Tensor:
    """out[b, h] = softmax(scale · q[b, h] · K_bᵀ) V_b over the first lengths[b] tokens of sequence b."""
    k = keys[tables.slots].transpose(1, 2)  # [B, KVH, L, D]
    v = values[tables.slots].transpose(1, 2)
    mask = tables.within_length[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)
