"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step, running sequences go first (one token each when decoding, the next chunk when
their prompt is still being read), then waiting ones are admitted while the step's token
budget and the KV pool allow. Prompts are read in chunks of at most the token budget, so a
long prompt shares its steps with the decodes instead of stalling them.

When the pool runs dry the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the head of the queue, to be recomputed later. The oldest running
sequence is never preempted, and every admitted request fits the pool alone, so each one
finishes however long the others are.

A request runs only while it holds what it needs besides KV blocks (its adapters' device
slots): `acquire` is asked at admission and may say "not yet", in which case the requests
behind it are admitted meanwhile; `release` gives those back when it stops running.

With prefix caching, a request admitted with nothing computed first takes the longest run of
cached blocks its tokens start with (never its last token, whose logits it needs), and its
own blocks go into the cache as they fill (`computed`). A request that wants its prompt's
logprobs computes every position, but still fills the cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from plait.server.engine.kv_cache import PagedKVCache, block_hashes
from plait.server.engine.request import Request, ScheduledChunk


class Scheduler:
    def __init__(
        self,
        kv_cache: PagedKVCache,
        max_batched_tokens: int,
        max_running: int,
        acquire: Callable[[Request], bool] = lambda request: True,
        release: Callable[[Request], None] = lambda request: None,
        prefix_caching: bool = True,
    ):
        self.kv_cache = kv_cache
        self.prefix_caching = prefix_caching
        self.prefix_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found there
        self.acquire = acquire
        self.release = release
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a request out, whether running or waiting, and give back its blocks."""
        if request in self.running:
            self.running.remove(request)
            self.release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_batched_tokens
        chunks: list[ScheduledChunk] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, n):
                if self._preempt_last(protect=req):
                    continue  # retry the same request with the freed blocks
                break
            chunks.append(ScheduledChunk.next_for(req, n))
            budget -= n
            i += 1
        # Only admit when nobody was left out above, so new arrivals cannot starve the running.
        if i == len(self.running):
            for req in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_running:
                    break
                if not self.acquire(req):
                    continue  # its adapter is still loading: let the ones behind it go first
                fresh = req.num_computed == 0
                if fresh:
                    self._take_cached_prefix(req)
                n = min(req.num_tokens - req.num_computed, budget)
                if not self._reserve(req, n):
                    self._release(req)
                    self.release(req)
                    break
                if fresh and self._looks_up(req):
                    self.prefix_queries += req.num_tokens
                    self.prefix_hits += req.num_computed
                    if req.cached_tokens is None:
                        req.cached_tokens = req.num_computed
                self.waiting.remove(req)
                self.running.append(req)
                chunks.append(ScheduledChunk.next_for(req, n))
                budget -= n
        return chunks

    def computed(self, req: Request, stop: int) -> None:
        """The first `stop` tokens of `req` are in the pool now; full blocks go into the cache."""
        req.num_computed = stop
        if not (self.prefix_caching and req.cache_salt is not None):
            return
        full = stop // self.kv_cache.block_size
        if full > req.num_blocks_cached:
            bs = self.kv_cache.block_size
            req.block_hashes = block_hashes(req.tokens(0, full * bs), req.cache_salt, bs, req.block_hashes[:full])
            for b in range(req.num_blocks_cached, full):
                self.kv_cache.allocator.cache(req.block_ids[b], req.block_hashes[b])
            req.num_blocks_cached = full

    def _looks_up(self, req: Request) -> bool:
        return self.prefix_caching and req.cache_salt is not None and req.params.prompt_logprobs is None

    def _take_cached_prefix(self, req: Request) -> None:
        if not self._looks_up(req):
            return
        bs = self.kv_cache.block_size
        usable = (req.num_tokens - 1) // bs  # the last token is always computed: its logits pick the next
        req.block_hashes = block_hashes(req.tokens(0, usable * bs), req.cache_salt, bs, req.block_hashes[:usable])
        req.block_ids = self.kv_cache.allocator.cached_prefix(req.block_hashes[:usable])
        req.num_blocks_cached = len(req.block_ids)
        req.num_computed = len(req.block_ids) * bs

    def _reserve(self, req: Request, num_new: int) -> bool:
        needed = self.kv_cache.blocks_needed(req.num_computed + num_new) - len(req.block_ids)
        if needed <= 0:
            return True
        if needed > self.kv_cache.allocator.num_free:
            return False
        req.block_ids += self.kv_cache.allocator.allocate(needed)
        return True

    def _preempt_last(self, protect: Request) -> bool:
        victim = self.running[-1]
        if victim is protect:
            return False
        self.running.pop()
        self._release(victim)
        self.release(victim)
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        return True

    def _release(self, req: Request) -> None:
        self.kv_cache.allocator.free(req.block_ids)
        req.block_ids = []
        req.num_computed = 0
        req.num_blocks_cached = 0
