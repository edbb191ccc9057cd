"""The paged KV pool: fixed-size blocks preallocated once, handed out from a free list.

A sequence owns a list of block ids; its token `i` lives at flat slot
`block_ids[i // block_size] * block_size + i % block_size` of every layer's key and value
tensors. Nothing is allocated per request, so memory use is known at start-up.
"""

from __future__ import annotations

import torch


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # Popped from the end: recently freed blocks are reused first, while still in cache.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked for, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, block_ids: list[int], start: int, stop: int) -> list[int]:
        """Flat slot of each token position in [start, stop) of a sequence owning `block_ids`."""
        bs = self.block_size
        return [block_ids[i // bs] * bs + i % bs for i in range(start, stop)]
