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
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: BlockTables,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """See `plait.kernels.paged_decode_attention`."""
    k = keys[tables.slots].transpose(1, 2)  # [B, KVH, L, D]
    v = values[tables.slots].transpose(1, 2)
    mask = tables.attended(window)[:, None, None, :]  # [B, 1, 1, L]
    if softcap is None:
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.squeeze(2)
    # SDPA has no soft-capping: the scores are capped by hand, as transformers' eager attention does.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, H, L, D]
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * scale
    scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~mask[:, :, 0], float("-inf")), dim=-1)
    return torch.einsum("bhl,bhld->bhd", weights, v.float()).to(q.dtype)
