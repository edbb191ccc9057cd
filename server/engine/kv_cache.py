"""The paged KV pool: fixed-size blocks preallocated once, shared by content, handed out LRU.

A sequence owns a list of block ids; its token `i` lives at flat slot
`block_ids[i // block_size] * block_size + i % block_size` of every layer's key and value
tensors. Nothing is allocated per request, so memory use is known at start-up.

Automatic prefix caching, as vLLM does it: a block whose tokens are all computed gets a hash of
its tokens chained with the hash of the block before it and salted with what else shaped its
keys and values (the request's adapters, see `Request.cache_salt`). A later sequence that
starts with the same blocks takes them instead of computing them again; blocks are counted by
reference, so several sequences read one. A block nobody uses any more keeps its contents and
its hash until the pool needs it back, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch


class OutOfBlocks(Exception):
    pass


def block_hashes(tokens: Sequence[int], salt: bytes, block_size: int, known: list[bytes]) -> list[bytes]:
    """The hashes of every full block of `tokens`, extending `known` (those of its first blocks)."""
    hashes = list(known)
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else salt
        chunk = array("q", tokens[start : start + block_size]).tobytes()
        hashes.append(hashlib.sha256(parent + chunk).digest())
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # Blocks no sequence holds, least recently freed first; cached ones keep their contents.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for new contents (a cached block handed out forgets what it held)."""
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked for, {len(self._free)} free")
        taken = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            old = self._hash_of[block]
            if old is not None:
                del self._cached[old]
                self._hash_of[block] = None
            self._refs[block] = 1
            taken.append(block)
        return taken

    def free(self, block_ids: list[int]) -> None:
        # Last blocks first, so a sequence's prefix outlives its tail in the cache.
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest run of `hashes` from the start, taken (counted) for the caller."""
        found = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        return found

    def cache(self, block: int, h: bytes) -> None:
        """Record that a held, full `block` holds the contents `h` names (unless another block does)."""
        if self._hash_of[block] is None and h not in self._cached:
            self._cached[h] = block
            self._hash_of[block] = h


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
        # One block more than the allocator hands out: the padding rows of a fixed-size step
        # write and read there, never in a sequence's blocks.
        self.scratch_block = num_blocks
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockPool(num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, block_ids: list[int], start: int, stop: int) -> list[int]:
        """Flat slot of each token position in [start, stop) of a sequence owning `block_ids`."""
        bs = self.block_size
        return [block_ids[i // bs] * bs + i % bs for i in range(start, stop)]
