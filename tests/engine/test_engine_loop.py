"""The engine's loop in-process, on a tiny random Llama: submit, abort, shutdown, a request waiting
on an adapter that is still loading, one bad request among good ones, and a loop that fails."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from plait.server.adapters.format import LoRAWeights, base_lora_targets
from plait.server.engine import (
    AdapterKey,
    Engine,
    EngineConfig,
    EngineUnavailable,
    FinishReason,
    LoRAConfig,
    SamplingParams,
)
from plait.server.errors import ClientError
from plait.server.metrics import Metrics

RANK = 4


class Adapters:
    """Random adapters read by `load`; reading one can be held back until `release` is called."""

    def __init__(self, targets: dict[str, tuple[int, int]], scale: float = 1.0):
        self.targets = targets
        self.scale = scale
        self.gate = threading.Event()
        self.gate.set()
        self.reads: list[AdapterKey] = []

    def load(self, key: AdapterKey):
        self.gate.wait(30)
        self.reads.append(key)
        generator = torch.Generator().manual_seed(key.version)
        size = 1e20 if key.adapter_id == "huge" else 0.1  # "huge" overflows float32 in its first layer

        def weights(n_in: int, n_out: int) -> LoRAWeights:
            a = torch.randn(RANK, n_in, generator=generator) * size
            b = torch.randn(n_out, RANK, generator=generator) * size
            return LoRAWeights(a, b, self.scale)

        return SimpleNamespace(modules={path: weights(*in_out) for path, in_out in self.targets.items()})


@pytest.fixture
def engine(tokenizer, tiny_llama):
    """A running engine (on a thread) and its adapters; shut down afterwards."""
    model = tiny_llama()
    adapters = Adapters(base_lora_targets(model))
    lora = LoRAConfig(targets=adapters.targets, load=adapters.load, max_device_adapters=2, max_rank=RANK)
    engine = Engine(
        model, tokenizer, EngineConfig(kv_cache_tokens=2048, max_waiting=4), torch.device("cpu"), Metrics(), lora
    )
    engine.adapters = adapters
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    _wait_for(lambda: engine.accepting)
    yield engine
    adapters.gate.set()
    engine.shutdown(drain_seconds=0)
    runner.join(10)


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _params(max_tokens: int = 4, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), ignore_eos=True, **kw)


async def _final(handle):
    async with asyncio.timeout(30):
        outputs = [o async for o in handle.outputs()]
    return outputs[-1], outputs


def test_a_request_runs_to_its_length_and_is_counted_out(engine, tokenizer):
    finished = []

    async def go():
        handle = engine.submit(tokenizer.encode("Hello"), _params(5), on_finish=lambda: finished.append(1))
        return await _final(handle)

    final, _ = asyncio.run(go())
    assert (final.finish_reason, final.completion_tokens, final.error) == (FinishReason.LENGTH, 5, None)
    assert len(final.token_ids) == 5 and finished == [1]
    assert engine.num_unfinished == 0


def test_an_aborted_request_ends_at_once_and_frees_its_place(engine, tokenizer):
    finished = []

    async def go():
        handle = engine.submit(
            tokenizer.encode("Hello"), _params(900), streaming=True, on_finish=lambda: finished.append(1)
        )
        outputs = handle.outputs()
        first = await anext(outputs)
        handle.close()  # what a client that hangs up does
        await outputs.aclose()
        return first

    first = asyncio.run(go())
    assert first.finish_reason is None and first.token_ids
    _wait_for(lambda: finished == [1] and engine.num_unfinished == 0)
    assert engine.metrics.registry.get_sample_value("plait_requests_total", {"finish_reason": "abort"}) == 1


def test_shutdown_ends_what_is_still_running(tokenizer, engine):
    async def go():
        handle = engine.submit(tokenizer.encode("Hello"), _params(900), streaming=True)
        outputs = handle.outputs()
        await anext(outputs)
        await asyncio.to_thread(engine.shutdown, 0.2)  # too short a drain for 900 tokens
        return [o async for o in outputs][-1]

    final = asyncio.run(go())
    assert (final.finish_reason, final.error) == (FinishReason.ABORT, "the server shut down")
    assert not engine.accepting
    with pytest.raises(EngineUnavailable):
        asyncio.run(_submit_only(engine, tokenizer))


async def _submit_only(engine, tokenizer):
    return engine.submit(tokenizer.encode("Hi"), _params(2))


def test_a_request_waits_for_its_adapter_without_holding_up_others_or_spinning(engine, tokenizer):
    adapters = engine.adapters
    adapters.gate.clear()  # reading the adapter takes until the gate opens
    calls = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: calls.append(1) or schedule()

    async def go():
        waiting = asyncio.ensure_future(
            _final(engine.submit(tokenizer.encode("Hi"), _params(3), adapters=((AdapterKey("slow", 1), 1.0),)))
        )
        base, _ = await _final(engine.submit(tokenizer.encode("Hi"), _params(3)))
        assert base.finish_reason is FinishReason.LENGTH and not waiting.done()
        await asyncio.sleep(0.3)
        before = len(calls)
        await asyncio.sleep(1.0)  # only the request waiting for its adapter is left
        idle_steps = len(calls) - before
        adapters.gate.set()
        adapted, _ = await waiting
        return idle_steps, adapted

    idle_steps, adapted = asyncio.run(go())
    assert idle_steps <= 4, f"the loop ran {idle_steps} times in a second with nothing it could do"
    assert adapted.finish_reason is FinishReason.LENGTH and adapters.reads == [AdapterKey("slow", 1)]


def test_a_request_whose_output_is_not_finite_fails_alone(engine, tokenizer):
    async def go():
        huge = engine.submit(
            tokenizer.encode("Hello"), _params(4), adapters=((AdapterKey("huge", 1), 1.0),), streaming=True
        )
        tiny_temperature = engine.submit(tokenizer.encode("Hello"), _params(4, temperature=1e-300))
        plain = engine.submit(tokenizer.encode("Hello"), _params(4))
        return await asyncio.gather(_final(huge), _final(tiny_temperature), _final(plain))

    (huge, _), (tiny, _), (plain, _) = asyncio.run(go())
    assert huge.finish_reason is FinishReason.ERROR and "not finite" in huge.error
    assert tiny.finish_reason is FinishReason.LENGTH and tiny.token_ids == plain.token_ids  # greedy
    assert plain.finish_reason is FinishReason.LENGTH
    assert engine.accepting and engine.failure is None


def test_refused_requests_are_not_counted(engine, tokenizer):
    async def go():
        for _ in range(10):  # more than max_waiting: a leak would end in EngineBusy
            with pytest.raises(ClientError) as refused:
                engine.submit(tokenizer.encode("Hi"), _params(2, seed=2**64))
            assert refused.value.param == "seed"
            with pytest.raises(ClientError) as refused:
                engine.submit(tokenizer.encode("Hi"), _params(2000))
            assert refused.value.code == "context_length_exceeded"
        assert engine.num_unfinished == 0
        return await _final(engine.submit(tokenizer.encode("Hi"), _params(2, seed=-(2**63))))

    final, _ = asyncio.run(go())
    assert final.finish_reason is FinishReason.LENGTH


def test_a_failing_loop_ends_every_request_and_stops_taking_more(tokenizer, tiny_llama):
    engine = Engine(
        tiny_llama(hidden=32, layers=1), tokenizer, EngineConfig(kv_cache_tokens=512), torch.device("cpu"), Metrics()
    )
    admitted = threading.Event()

    def broken_schedule():
        if engine.scheduler.waiting:
            admitted.set()
            raise RuntimeError("scheduler bug")
        return []

    engine.scheduler.schedule = broken_schedule
    failed = []

    def run():
        try:
            engine.run()
        except RuntimeError as exc:
            failed.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    _wait_for(lambda: engine.accepting)
    finished = []

    async def go():
        handle = engine.submit(tokenizer.encode("Hi"), _params(3), on_finish=lambda: finished.append(1))
        return await _final(handle)

    final, _ = asyncio.run(go())
    runner.join(10)
    assert admitted.is_set() and len(failed) == 1
    assert final.finish_reason is FinishReason.ERROR and "scheduler bug" in final.error
    assert finished == [1] and engine.num_unfinished == 0
    assert not engine.accepting and "scheduler bug" in engine.failure
    with pytest.raises(EngineUnavailable):
        asyncio.run(_submit_only(engine, tokenizer))


def test_prompt_logprobs_are_the_models_own_even_read_in_chunks(tokenizer, tiny_llama):
    """Scoring a prompt (lm-eval's log-likelihoods): the logprob of each prompt token given the ones
    before, as a plain forward pass of the same model gives them, with the prompt read 4 tokens a
    step, and `max_tokens` 0 generating nothing."""
    engine = Engine(tiny_llama(), tokenizer, EngineConfig(max_batched_tokens=4), torch.device("cpu"), Metrics())
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    _wait_for(lambda: engine.accepting)
    prompt = tokenizer.encode("The capital of France is Paris, and that of Italy is Rome.")

    async def go():
        scored = engine.submit(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
        generated = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0))
        return await asyncio.gather(_final(scored), _final(generated))

    try:
        (scored, _), (generated, outputs) = asyncio.run(go())
    finally:
        engine.shutdown(drain_seconds=0)
        runner.join(10)
    with torch.inference_mode():
        logits = tiny_llama(attention="sdpa")(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert scored.finish_reason is FinishReason.LENGTH and scored.token_ids == () and scored.completion_tokens == 0
    assert [lp.token_id for lp in scored.prompt_logprobs] == prompt[1:]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in scored.prompt_logprobs]), expected, atol=1e-4, rtol=0)
    assert all(len(lp.top) == 2 for lp in scored.prompt_logprobs)
    assert generated.prompt_logprobs == tuple(
        lp.__class__(lp.token_id, lp.logprob, ()) for lp in scored.prompt_logprobs
    )
    assert len(generated.token_ids) == 2 and sum(o.prompt_logprobs is not None for o in outputs) == 1


def test_a_grammar_holds_every_answer_in_a_mixed_batch(engine, tokenizer):
    import json

    import xgrammar as xgr

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
        "required": ["ok", "color"],
        "additionalProperties": False,
    }
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=engine.vocab_size)
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)

    async def go(seeds: range):  # three constrained and one free at a time (the engine's max_waiting is 4)
        constrained = [
            engine.submit(tokenizer.encode("Hi"), SamplingParams(max_tokens=40, seed=s, grammar=grammar)) for s in seeds
        ]
        free = engine.submit(tokenizer.encode("Hi"), _params(8, seed=seeds[0], temperature=1.0))
        return await asyncio.gather(*(_final(h) for h in [*constrained, free]))

    first, second = asyncio.run(go(range(3))), asyncio.run(go(range(3, 6)))
    results = first[:3] + second[:3] + [first[3], second[3]]
    for final, outputs in results[:6]:
        text = "".join(o.text for o in outputs)
        assert final.finish_reason is FinishReason.STOP, text
        answer = json.loads(text)
        assert set(answer) == {"ok", "color"} and isinstance(answer["ok"], bool) and answer["color"] in ("red", "green")
    assert all(final.finish_reason is FinishReason.LENGTH for final, _ in results[6:])  # the free ones ran on


def _run_engine(tokenizer, tiny_llama, prefix_caching: bool, jobs, kv_cache_tokens: int = 2048):
    """Run `jobs` (lists of (prompt ids, adapter key or None) submitted together, one list after
    another) on a fresh engine; the final output of each job, in order."""
    model = tiny_llama()
    adapters = Adapters(base_lora_targets(model))
    config = EngineConfig(kv_cache_tokens=kv_cache_tokens, max_batched_tokens=64, prefix_caching=prefix_caching)
    lora = LoRAConfig(targets=adapters.targets, load=adapters.load, max_device_adapters=2, max_rank=RANK)
    engine = Engine(model, tokenizer, config, torch.device("cpu"), Metrics(), lora)
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    _wait_for(lambda: engine.accepting)

    async def wave(batch):
        handles = [
            engine.submit(ids, _params(12, top_logprobs=0), adapters=((key, 1.0),) if key else ()) for ids, key in batch
        ]
        return [final for final, _ in await asyncio.gather(*(_final(h) for h in handles))]

    try:
        results = [final for batch in jobs for final in asyncio.run(wave(batch))]
    finally:
        engine.shutdown(drain_seconds=0)
        runner.join(10)
    return results, engine


def test_cached_prefixes_answer_as_computed_ones(tokenizer, tiny_llama):
    """The same greedy tokens and logprobs with and without the cache: for the base, for an
    adapter, across an adapter replacement (a new version never reuses the old one's blocks),
    and with a pool small enough that sequences are preempted and recomputed."""
    system = tokenizer.encode("You are a careful assistant. " * 12)
    asks = [tokenizer.encode(f" Question {i}: what comes next?") for i in range(4)]
    v1, v2 = AdapterKey("skill", 1), AdapterKey("skill", 2)
    jobs = [
        [(system + asks[0], None)],
        [(system + asks[1], None), (system + asks[2], None)],
        [(system + asks[0], v1)],
        [(system + asks[1], v1), (system + asks[3], None)],
        [(system + asks[2], v2)],
    ]
    cached, engine = _run_engine(tokenizer, tiny_llama, True, jobs)
    plain, _ = _run_engine(tokenizer, tiny_llama, False, jobs)
    for got, expected in zip(cached, plain, strict=True):
        assert got.token_ids == expected.token_ids
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in got.logprobs]),
            torch.tensor([lp.logprob for lp in expected.logprobs]),
            atol=1e-4,
            rtol=0,
        )
    full_blocks = len(system) // 16 * 16
    assert [c.cached_tokens for c in cached] == [0, full_blocks, full_blocks, 0, full_blocks, full_blocks, 0]
    assert all(p.cached_tokens == 0 for p in plain)
    hits = engine.metrics.registry.get_sample_value("vllm:prefix_cache_hits_total")
    assert hits == 4 * full_blocks

    # A pool of 12 blocks for four sequences of about 100 tokens each that grow: preempted, and
    # recomputed from what they left in the cache.
    stories = [tokenizer.encode(f"Story {i}: " + "once upon a time there was a cat. " * 10) for i in range(4)]
    crowded = [[(story, None) for story in stories], [(story, v1) for story in stories]]
    tight, tight_engine = _run_engine(tokenizer, tiny_llama, True, crowded, kv_cache_tokens=12 * 16)
    roomy, _ = _run_engine(tokenizer, tiny_llama, False, crowded)
    assert tight_engine.metrics.registry.get_sample_value("plait_preemptions_total") > 0
    assert [t.token_ids for t in tight] == [r.token_ids for r in roomy]


def test_the_engine_thread_applies_a_new_thread_count(engine, tokenizer, monkeypatch):
    applied = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: applied.append((n, threading.current_thread().name)))
    engine.set_threads(1)

    async def go():
        return await _final(engine.submit(tokenizer.encode("Hi"), _params(2)))

    asyncio.run(go())
    assert applied and applied[0][0] == 1 and applied[0][1] != threading.current_thread().name
