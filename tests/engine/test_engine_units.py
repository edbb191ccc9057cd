"""The engine's parts on their own: KV blocks, scheduling and preemption, detokenizing with
stops, adapter slots."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from plait.server.base_model import resolve_model
from plait.server.engine import AdapterKey
from plait.server.engine.adapter_slots import AdapterSlots
from plait.server.engine.detokenizer import IncrementalDetokenizer
from plait.server.engine.kv_cache import BlockPool, OutOfBlocks, PagedKVCache, block_hashes
from plait.server.engine.request import Request, SamplingParams
from plait.server.engine.scheduler import Scheduler


def test_block_pool_hands_out_each_block_once():
    alloc = BlockPool(8)
    a, b = alloc.allocate(3), alloc.allocate(5)
    assert sorted(a + b) == list(range(8)) and alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    alloc.free(a)
    assert sorted(alloc.allocate(3)) == sorted(a)


def test_cached_blocks_are_shared_counted_and_given_back_least_recent_first():
    pool = BlockPool(4)
    a = pool.allocate(2)
    hashes = block_hashes(list(range(8)), b"salt", 4, [])
    for block, h in zip(a, hashes, strict=True):
        pool.cache(block, h)
    assert pool.cached_prefix(hashes) == a and pool.num_free == 2  # shared: still two in use
    pool.free(a)
    pool.free(a)
    assert pool.num_free == 4
    assert pool.cached_prefix(hashes[:1]) == a[:1]  # freed, but the contents are still there
    pool.free(a[:1])
    others = pool.allocate(3)  # takes the never-used blocks first, then the least recently freed
    assert a[1] in others and a[0] not in others
    assert pool.cached_prefix(hashes) == a[:1]  # block a[1] was reused for other contents
    assert block_hashes(list(range(8)), b"other salt", 4, []) != hashes
    assert block_hashes(list(range(9)), b"salt", 4, hashes[:1]) == hashes  # extends, ignores the partial block


def test_a_prompt_that_starts_like_a_computed_one_takes_its_blocks():
    kv = _kv(16)
    sched = Scheduler(kv, max_batched_tokens=64, max_running=4)
    first = _request("first", 10)
    first.cache_salt = second_salt = b"base"
    sched.add(first)
    (chunk,) = sched.schedule()
    sched.computed(first, chunk.stop)
    second = _request("second", 11)
    second.cache_salt = second_salt
    sched.add(second)
    chunks = sched.schedule()
    assert [c.request.request_id for c in chunks] == ["first", "second"]
    assert chunks[1].start == 8 and second.block_ids[:2] == first.block_ids[:2] and second.cached_tokens == 8
    assert (sched.prefix_queries, sched.prefix_hits) == (10 + 11, 8)
    other = _request("other", 11)
    other.cache_salt = b"an adapter"
    sched.add(other)
    assert sched.schedule()[-1].start == 0 and other.cached_tokens == 0


def _kv(num_blocks: int, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(1, num_blocks, block_size, 1, 2, torch.float32, torch.device("cpu"))


def test_slots_follow_the_block_table():
    kv = _kv(8)
    assert kv.slots([5, 2], 2, 7) == [22, 23, 8, 9, 10]


def _request(name: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0))


def _advance(chunks, token: int = 7) -> None:
    """What the engine does after a forward pass: mark computed, append sampled tokens."""
    for c in chunks:
        c.request.num_computed = c.stop
        if c.samples:
            c.request.output_ids.append(token)


def test_long_prompt_is_read_in_chunks_beside_decodes():
    sched = Scheduler(_kv(64), max_batched_tokens=8, max_running=4)
    short, long = _request("short", 3), _request("long", 20)
    sched.add(short)
    _advance(sched.schedule())  # short's prompt
    sched.add(long)
    seen = []
    for _ in range(4):
        chunks = sched.schedule()
        seen.append([(c.request.request_id, c.num_new, c.samples) for c in chunks])
        _advance(chunks)
    # The decode goes first every step; the long prompt takes what is left of the budget.
    assert seen == [
        [("short", 1, True), ("long", 7, False)],
        [("short", 1, True), ("long", 7, False)],
        [("short", 1, True), ("long", 6, True)],
        [("short", 1, True), ("long", 1, True)],
    ]


def test_pool_exhaustion_preempts_the_newest_and_everyone_finishes():
    kv = _kv(6, block_size=4)  # 24 token slots
    sched = Scheduler(kv, max_batched_tokens=64, max_running=4)
    reqs = [_request("a", 8, max_tokens=14), _request("b", 4, max_tokens=6), _request("c", 4, max_tokens=6)]
    for r in reqs:
        sched.add(r)
    finished = []
    for _ in range(200):
        if not sched.has_work():
            break
        chunks = sched.schedule()
        assert chunks, "no progress"
        assert kv.allocator.num_used <= 6
        _advance(chunks)
        for c in chunks:
            if len(c.request.output_ids) >= c.request.params.max_tokens:
                sched.remove(c.request)
                finished.append(c.request.request_id)
    assert sorted(finished) == ["a", "b", "c"]
    assert sched.num_preemptions > 0
    assert kv.allocator.num_free == 6
    # A recomputed request kept its output: exactly max_tokens tokens each.
    assert [len(r.output_ids) for r in reqs] == [14, 6, 6]


def test_running_limit_holds_new_requests_back():
    sched = Scheduler(_kv(64), max_batched_tokens=64, max_running=2)
    for i in range(3):
        sched.add(_request(str(i), 2))
    assert [c.request.request_id for c in sched.schedule()] == ["0", "1"]
    assert [r.request_id for r in sched.waiting] == ["2"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(None).path)


def _feed(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text):
        deltas.append(detok.push(token))
        if detok.stopped:
            break
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas, detok


def test_detokenizer_deltas_add_up_to_the_text(tokenizer):
    text = "Héllo wörld — naïve café 東京 🙂 done."
    deltas, _ = _feed(tokenizer, text, ())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_sent(tokenizer):
    deltas, detok = _feed(tokenizer, "The answer is forty-two, said the machine.", ("forty-two",))
    assert detok.stopped
    assert "".join(deltas) == "The answer is "
    assert not any("forty" in d for d in deltas)


def test_text_that_only_looks_like_a_stop_is_released(tokenizer):
    deltas, detok = _feed(tokenizer, "fort and forty", ("forty-two",))
    assert not detok.stopped and "".join(deltas) == "fort and forty"


def test_earliest_of_several_stops_wins(tokenizer):
    deltas, _ = _feed(tokenizer, "one two three four", ("four", "two"))
    assert "".join(deltas) == "one "


def test_each_token_decodes_a_window_of_constant_size(tokenizer):
    """A long output costs the same per token at its end as at its start: count the tokens the
    detokenizer hands the tokenizer on each push (decoding the whole output would hand it all)."""

    class Counting:
        def __init__(self) -> None:
            self.decoded: list[int] = []

        def decode(self, ids, **kwargs) -> str:
            self.decoded[-1] += len(ids)
            return tokenizer.decode(ids, **kwargs)

    text = "Héllo wörld — naïve café 東京 🙂 done. " * 60
    counting = Counting()
    detok = IncrementalDetokenizer(counting, ("never appears",))
    deltas = []
    for token in tokenizer.encode(text):
        counting.decoded.append(0)
        deltas.append(detok.push(token))
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert len(counting.decoded) > 1000
    assert max(counting.decoded) <= 16  # a few tokens of window, twice, at most: not the output so far


class _Layers:
    """What AdapterSlots needs of LoRALayers: slots to load into."""

    num_slots = 2
    modules: dict = {}

    def load(self, slot: int, modules) -> None:
        pass


def _ready_slot(slots: AdapterSlots, key) -> int:
    """Acquire `key`, waiting for the reader thread the first time."""
    for _ in range(200):
        slot = slots.acquire(key)
        if slot is not None:
            return slot
        time.sleep(0.01)
    raise AssertionError(f"{key} never loaded")


def test_forgetting_an_adapter_frees_its_cached_copies_but_not_pinned_slots():
    reads: list[AdapterKey] = []

    def load(key: AdapterKey):
        reads.append(key)
        return SimpleNamespace(modules={})

    slots = AdapterSlots(_Layers(), max_cpu_adapters=8, load=load, wake=lambda: None)
    old, new, other = AdapterKey("a", 1), AdapterKey("a", 2), AdapterKey("b", 1)
    slots.release(_ready_slot(slots, old))
    pinned = _ready_slot(slots, other)
    slots.forget("a", keep_version=2)  # "a" was replaced: version 1 goes, "b" stays
    assert slots.resident() == [other]
    slots.release(_ready_slot(slots, old))  # asked for again, it is read again
    assert reads == [old, other, old]
    slots.forget("b")  # deleted while a request still runs on it: the pinned slot stays
    assert other in slots.resident()
    slots.release(pinned)
    slots.forget("b")
    assert other not in slots.resident()
    slots.release(_ready_slot(slots, new))
    slots.forget("a", keep_version=2)
    assert slots.resident() == [new]
    slots.close()
