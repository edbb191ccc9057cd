"""Segmented-gather LoRA ops: many adapters applied to one flattened token batch; and paged
decode attention, each sequence's query against its blocks of a shared KV pool.

    pool = LoRAPool.create(num_slots, in_features, (q_out, k_out, v_out), max_rank, ...)
    pool.load(slot, [A_q, A_k, A_v], [B_q, B_k, B_v], [scale_q, scale_k, scale_v])
    batch = make_lora_batch(segment_lengths, segment_slots, device=...)   # once per step
    add_lora(y, x, pool, batch)                                          # every layer

    tables = make_block_tables(block_ids, lengths, block_size, device=...)   # once per step
    out = paged_decode_attention(q, keys, values, tables)                  # every layer

See kernels/README.md for the layout and the kernels.
"""

from .block_tables import BlockTables, make_block_tables
from .dispatch import Backend, add_lora, interpret_requested, lora_expand, lora_shrink, paged_decode_attention
from .metadata import LoRABatch, SlotSpec, make_lora_batch, make_row_lora_batch
from .pool import LoRAPool

__all__ = [
    "Backend",
    "BlockTables",
    "LoRABatch",
    "LoRAPool",
    "SlotSpec",
    "add_lora",
    "interpret_requested",
    "lora_expand",
    "lora_shrink",
    "make_block_tables",
    "make_lora_batch",
    "make_row_lora_batch",
    "paged_decode_attention",
]
