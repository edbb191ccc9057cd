"""Where each decoding sequence's keys and values sit in a paged pool.

A pool holds every cached token's key and value at a flat slot; slots come in blocks of
`block_size`, and token `i` of a sequence owning blocks `ids` sits at slot
`ids[i // block_size] * block_size + i % block_size`. Built once per engine step, read by the
attention of every layer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class BlockTables:
    """The blocks and lengths of B sequences (one query each) in a paged pool.

    The Triton kernel reads a table only up to its sequence's length; the PyTorch path reads
    every entry, so padding entries must still be valid block ids (0 is).
    """

    tables: torch.Tensor
    """int32 [B, max_blocks]: block ids of sequence b, in order, padded with 0."""
    lengths: torch.Tensor
    """int32 [B]: tokens sequence b attends to (>= 1), its new one included."""
    block_size: int
    """Slots per block (any size; the kernel pads its tile to a power of two)."""
    max_length: int
    """A bound on `lengths` (Python, so no device sync): the PyTorch path attends over this many positions."""

    # Computed on first use and kept: every layer of a step reads the same tables, and on a CPU
    # these few small ops per layer cost 8% of a decode step.
    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """int64 [B, max_length]: the pool slot of each position (past a length: padding's, unspecified)."""
        pos = torch.arange(self.max_length, device=self.device)
        return self.tables.long()[:, pos // self.block_size] * self.block_size + pos % self.block_size

    @functools.cached_property
    def within_length(self) -> torch.Tensor:
        """bool [B, max_length]: which positions each sequence attends to."""
        return torch.arange(self.max_length, device=self.device) < self.lengths.long()[:, None]

    @functools.cached_property
    def _windowed(self) -> dict[int, torch.Tensor]:
        return {}

    def attended(self, window: int | None = None) -> torch.Tensor:
        """bool [B, max_length]: the positions each sequence attends to, all of its first
        lengths[b] or, with a sliding window, only the last `window` of them."""
        if window is None:
            return self.within_length
        if window not in self._windowed:
            pos = torch.arange(self.max_length, device=self.device)
            self._windowed[window] = self.within_length & (pos >= self.lengths.long()[:, None] - window)
        return self._windowed[window]

    @property
    def num_seqs(self) -> int:
        return self.tables.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tables.device


def make_block_tables(
    block_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    block_size: int,
    *,
    device: torch.device | str = "cpu",
) -> BlockTables:
    """Tables for sequences owning `block_ids` and attending to their first `lengths` tokens."""
    if len(block_ids) != len(lengths):
        raise ValueError(f"{len(block_ids)} block lists but {len(lengths)} lengths")
    if any(n < 1 or -(-n // block_size) > len(ids) for ids, n in zip(block_ids, lengths, strict=True)):
        raise ValueError("every length must be >= 1 and fit in its sequence's blocks")
    max_length = max(lengths, default=1)
    width = -(-max_length // block_size)
    rows = [list(ids[:width]) + [0] * (width - len(ids[:width])) for ids in block_ids]
    # One host-to-device copy for both tensors.
    packed = torch.tensor([v for row in rows for v in row] + list(lengths), dtype=torch.int32).to(device)
    tables, lens = packed.split([len(rows) * width, len(rows)])
    return BlockTables(tables.view(len(rows), width), lens, block_size, max_length)
