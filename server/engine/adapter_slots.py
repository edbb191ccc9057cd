"""Which adapters sit in the device slots, which in the CPU cache, and loading between them.

Three tiers, each least-recently-used: a fixed number of device slots (the pools of
`LoRALayers`), a CPU cache of parsed adapters, and the on-disk store behind `load`. A slot
used by a running request is pinned and never evicted under it. Reading an adapter from
disk happens on a worker thread, so a request for a cold adapter waits without holding up
requests for adapters already resident; the engine is woken when the read is done.

Adapters are keyed by (id, version): a replaced adapter is a new key, so requests already
running on the old weights finish on them while new requests load the new ones. A merged
combination of adapters (TIES, DARE) is a key of its own (`MergedKey`): its members are read
and handed to the `merge` function on the reader thread the first time it is asked for, then
it is cached and evicted like any adapter. What an adapter is and how adapters merge is not
the engine's business: it only needs the `modules` of what `load` and `merge` return.

Every method runs on the engine thread except `_read`, which runs on the reader thread and
touches nothing here but the two functions it was given; its result comes back through a
future that the engine thread collects.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from plait.server.engine.lora import LoRALayers

log = logging.getLogger("plait.adapters")


@dataclass(frozen=True)
class AdapterKey:
    """One unchanging version of an adapter."""

    adapter_id: str
    version: int

    def superseded(self, adapter_id: str, keep_version: int | None) -> bool:
        """Whether this is a version of `adapter_id` other than `keep_version` (any, when None)."""
        return self.adapter_id == adapter_id and self.version != keep_version


class MergeRecipe(Hashable, Protocol):
    """How a `MergedKey`'s members combine; the engine hands it to `merge` as it is."""

    method: str


@dataclass(frozen=True)
class MergedKey:
    """Several adapters merged into one, as `recipe` says (e.g. `plait.server.adapters.merge.MergeSpec`)."""

    members: tuple[tuple[AdapterKey, float], ...]
    recipe: MergeRecipe

    @property
    def adapter_id(self) -> str:
        return f"{self.recipe.method}({','.join(key.adapter_id for key, _ in self.members)})"


SlotKey = AdapterKey | MergedKey
# Reads one adapter version; returns an object whose `modules` maps module paths to weights
# with `a`, `b` and `scale` (what `LoRALayers.load` takes).
LoadAdapter = Callable[[AdapterKey], Any]
# Builds one such adapter from (adapter, weight) pairs and a recipe.
MergeAdapters = Callable[[Sequence[tuple[Any, float]], MergeRecipe], Any]


class AdapterSlots:
    def __init__(
        self,
        layers: LoRALayers,
        max_cpu_adapters: int,
        load: LoadAdapter,
        wake: Callable[[], None],
        merge: MergeAdapters | None = None,
        on_event: Callable[[str, str], None] = lambda event, adapter_id: None,
    ):
        self.layers = layers
        self.max_cpu_adapters = max_cpu_adapters
        self._load = load
        self._merge = merge
        self._wake = wake
        self._on_event = on_event  # ("load" | "evict", adapter id), for metrics
        self._slot_of: dict[SlotKey, int] = {}
        self._key_in: list[SlotKey | None] = [None] * layers.num_slots
        self._pins = [0] * layers.num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident slots, least recent first
        self._cpu: OrderedDict[SlotKey, object] = OrderedDict()
        self._reading: dict[SlotKey, Future] = {}
        self._failed: dict[SlotKey, str] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-adapter-read")

    @property
    def num_slots(self) -> int:
        return self.layers.num_slots

    def resident(self) -> list[SlotKey]:
        return [k for k in self._key_in if k is not None]

    def failure(self, key: SlotKey) -> str | None:
        """Why `key` could not be read, if it could not; the caller fails its requests."""
        return self._failed.pop(key, None)

    def acquire(self, key: SlotKey) -> int | None:
        """Pin a slot holding `key`, loading it if needed; None if it is not ready yet."""
        slot = self._slot_of.get(key)
        if slot is None:
            adapter = self._from_cpu(key)
            if adapter is None:
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self.layers.load(slot, adapter.modules)
            self._slot_of[key], self._key_in[slot] = slot, key
            self._on_event("load", key.adapter_id)
        self._pins[slot] += 1
        self._lru[slot] = None
        self._lru.move_to_end(slot)
        return slot

    def release(self, slot: int) -> None:
        self._pins[slot] -= 1

    def _from_cpu(self, key: SlotKey):
        adapter = self._cpu.get(key)
        if adapter is not None:
            self._cpu.move_to_end(key)
            return adapter
        future = self._reading.get(key)
        if future is None:
            if key not in self._failed:
                future = self._reader.submit(self._read, key)
                future.add_done_callback(lambda _: self._wake())
                self._reading[key] = future
            return None
        if not future.done():
            return None
        del self._reading[key]
        try:
            adapter = future.result()
        except Exception as exc:  # a store read that failed fails the requests that wanted it
            log.warning("cannot load adapter %s: %s", key.adapter_id, exc)
            self._failed[key] = str(exc)
            return None
        self._cpu[key] = adapter
        while len(self._cpu) > self.max_cpu_adapters:
            self._cpu.popitem(last=False)
        return adapter

    def _read(self, key: SlotKey):
        if isinstance(key, MergedKey):
            if self._merge is None:
                raise ValueError("this engine merges no adapters")
            return self._merge([(self._load(member), weight) for member, weight in key.members], key.recipe)
        return self._load(key)

    def forget(self, adapter_id: str, keep_version: int | None = None) -> None:
        """Drop what is cached of an adapter's versions other than `keep_version` (all of them
        when None: it was deleted), merged adapters built from them included. Slots that running
        requests pin stay until those finish, then age out like any other."""

        def stale(key: SlotKey) -> bool:
            members = [m for m, _ in key.members] if isinstance(key, MergedKey) else [key]
            return any(m.superseded(adapter_id, keep_version) for m in members)

        for key in [k for k in self._cpu if stale(k)]:
            del self._cpu[key]
        for slot, key in enumerate(self._key_in):
            if key is not None and stale(key) and self._pins[slot] == 0:
                self._evict(slot)

    def _free_slot(self) -> int | None:
        for slot, key in enumerate(self._key_in):
            if key is None:
                return slot
        for slot in self._lru:  # least recently used first
            if self._pins[slot] == 0:
                self._evict(slot)
                return slot
        return None

    def _evict(self, slot: int) -> None:
        old = self._key_in[slot]
        del self._slot_of[old]
        self._key_in[slot] = None
        del self._lru[slot]
        self._on_event("evict", old.adapter_id)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
