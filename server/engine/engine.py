"""The engine: a loop that steps the model while requests come and go.

The HTTP layer lives on an asyncio loop in another thread; the model runs in `Engine.run`,
so a forward pass never blocks the HTTP side (torch releases the GIL while it computes).
Callers talk to the engine only through its inbox, a queue of typed messages read between
steps (`submit`, `abort`, `forget_adapter`, `shutdown` put them there); each request's
outputs go back to its own asyncio queue on the caller's loop. Everything else here is
touched by the engine thread alone, except the admission counts (unfinished and running
requests, under a lock) and the accepting/stopping flags (single writes the loop reads).

`run` belongs on the process's main thread: with torch's OpenMP pool driven from any
other thread, a decode step on 2 CPU cores took 3x as long (measured: 88 ms against 28 ms).

A request that goes wrong (its forward pass raises, its logits are not finite, its adapter
cannot be read) finishes alone with an error. Should the loop itself ever raise, every
request in flight finishes with an error, `failure` says why, the engine stops accepting
work, and `run` raises, so the process can exit and be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from plait.server.engine.adapter_slots import AdapterSlots, LoadAdapter, MergeAdapters, SlotKey
from plait.server.engine.detokenizer import IncrementalDetokenizer
from plait.server.engine.grammar import GrammarState
from plait.server.engine.kv_cache import PagedKVCache
from plait.server.engine.lora import LoRALayers
from plait.server.engine.model_runner import ModelRunner
from plait.server.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    ScheduledChunk,
    TokenLogprob,
)
from plait.server.engine.routing import Router
from plait.server.engine.sampler import NonFiniteLogits, sample, top_logprobs
from plait.server.engine.scheduler import Scheduler
from plait.server.engine.static_decode import StaticDecode
from plait.server.errors import ClientError
from plait.server.metrics import Metrics

log = logging.getLogger("plait.engine")

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_tokens: int = 32768
    max_batched_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 256
    max_model_len: int | None = None  # default: the model's own limit, capped by the KV pool
    prefix_caching: bool = True  # share the keys and values of prompts' common starts (see kv_cache)
    # Decode steps of up to this many sequences run through fixed buffers, captured as CUDA graphs
    # on a CUDA device (see static_decode); 0: off.
    cuda_graph_batch: int = 0


@dataclass(frozen=True)
class LoRAConfig:
    """How the engine serves adapters: device slots, CPU cache, and where adapters come from."""

    targets: dict[str, tuple[int, int]]  # module path -> (in, out) of every LoRA-capable linear layer
    load: LoadAdapter  # reads one adapter version (an object with .modules)
    merge: MergeAdapters | None = None  # builds a MergedKey's adapter from its members'
    max_device_adapters: int = 8
    max_cpu_adapters: int = 32
    max_rank: int = 64


class EngineBusy(ClientError):
    """The admission queue is full: the client should retry later."""

    status = 429
    code = "rate_limit_exceeded"


class EngineUnavailable(ClientError):
    """The engine is not taking requests: starting, draining, stopped or failed."""

    status = 503
    code = "unavailable"


class _Stream:
    """Engine-side bookkeeping of one request and the way back to its caller.

    A streaming caller gets every step's output; any other caller only the finished whole,
    so it is woken once per request rather than once per token.
    """

    def __init__(
        self,
        request: Request,
        detokenizer: IncrementalDetokenizer,
        loop: asyncio.AbstractEventLoop,
        outputs: asyncio.Queue,
        streaming: bool,
        on_finish: Callable[[], None] | None,
    ):
        self.request = request
        self.detokenizer = detokenizer
        self.loop = loop
        self.outputs = outputs
        self.streaming = streaming
        self.on_finish = on_finish
        self.held: list[RequestOutput] = []

    def emit(self, output: RequestOutput) -> None:
        if not self.streaming and output.finish_reason is None:
            self.held.append(output)
            return
        if self.held:
            output, self.held = RequestOutput.joined([*self.held, output]), []
        # A closed loop means the caller is gone and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)


# --- the inbox: what other threads tell the engine ---


@dataclass(frozen=True)
class _Add:
    stream: _Stream


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Forget:
    adapter_id: str
    keep_version: int | None


@dataclass(frozen=True)
class _SetThreads:
    threads: int


@dataclass(frozen=True)
class _Wake:
    """Nothing to do but look again: an adapter finished loading, or the engine is stopping."""


_Message = _Add | _Abort | _Forget | _SetThreads | _Wake


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig,
        device: torch.device,
        metrics: Metrics,
        lora: LoRAConfig | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.metrics = metrics
        mc = model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        num_blocks = -(-config.kv_cache_tokens // config.block_size)
        self.kv_cache = PagedKVCache(
            mc.num_hidden_layers,
            num_blocks,
            config.block_size,
            mc.num_key_value_heads,
            head_dim,
            dtype=model.dtype,
            device=device,
        )
        model_limit = _context_limit(mc) or self.kv_cache.capacity_tokens
        self.max_model_len = min(config.max_model_len or model_limit, model_limit, self.kv_cache.capacity_tokens)
        self.adapter_slots: AdapterSlots | None = None
        layers = None
        if lora is not None:
            layers = LoRALayers(model, lora.targets, lora.max_device_adapters, lora.max_rank, model.dtype, device)
            self.adapter_slots = AdapterSlots(
                layers,
                lora.max_cpu_adapters,
                lora.load,
                wake=lambda: self._inbox.put(_Wake()),
                merge=lora.merge,
                on_event=self._adapter_event,
            )
        static = None
        if config.cuda_graph_batch:
            static = StaticDecode(
                model,
                self.kv_cache,
                layers,
                device,
                min(config.cuda_graph_batch, config.max_running),
                self.max_model_len,
            )
            if device.type == "cuda":
                started = time.monotonic()
                static.capture()
                log.info(
                    "captured decode steps of %s sequences as CUDA graphs in %.1f s",
                    ", ".join(map(str, static.sizes)),
                    time.monotonic() - started,
                )
        self.runner = ModelRunner(model, self.kv_cache, device, layers, static)
        self.scheduler = Scheduler(
            self.kv_cache,
            config.max_batched_tokens,
            config.max_running,
            self._acquire_adapters,
            self._release_adapters,
            prefix_caching=config.prefix_caching,
        )
        self.stop_token_ids = _stop_token_ids(model, tokenizer)
        self.vocab_size = model.get_output_embeddings().out_features  # the width of a row of logits
        self.metrics.kv_blocks_total.set(num_blocks)

        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards the admission counts below
        self._unfinished = 0
        self._running = 0  # len(scheduler.running) as of the last step
        self._accepting = False
        self._stopping = False
        self._ids = itertools.count()
        self.failure: str | None = None  # why the loop stopped, if it failed

    def run(self) -> None:
        """Serve requests on the calling thread until `shutdown`; raises if the loop itself fails."""
        self._accepting = not self._stopping
        try:
            self._loop()
        except BaseException as exc:
            with self._lock:  # no request gets in after this
                self._accepting = False
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("the engine failed; every request in flight ends with an error", exc_info=True)
            for stream in [*self._streams.values(), *self._unread_requests()]:
                self._abandon(stream, f"the engine failed ({self.failure})")
            raise

    # --- the caller's side (the asyncio loop) ---

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def num_unfinished(self) -> int:
        return self._unfinished

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        streaming: bool = False,
        adapters: tuple[tuple[SlotKey, float], ...] = (),
        router: Router | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> RequestHandle:
        """Queue a request. Raises ClientError (EngineBusy past the waiting bound, EngineUnavailable
        when closed) and then never calls `on_finish`; otherwise `on_finish` runs on the engine
        thread once the request has ended, however it ends.

        `adapters` are the (adapter, weight) pairs whose deltas the request's tokens get; none
        means the bare base model. A `router` (a fusion's) sets those weights per token and
        layer instead, and the final output reports its average weight per adapter. A
        streaming request's handle yields an output per step; any other's, the whole at the end.
        """
        if router is not None and not adapters:
            raise ValueError("a router needs the adapters it routes among")
        if adapters and self.adapter_slots is None:
            raise ClientError("This server was started without adapter support.", "adapters")
        num_slots = self.adapter_slots.num_slots if self.adapter_slots else 0
        if len(adapters) > num_slots:
            raise ClientError(f"A request may combine at most {num_slots} adapters.", "adapters")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ClientError(
                f"{len(prompt_ids)} prompt tokens + {params.max_tokens} max tokens "
                f"exceed the context length {self.max_model_len}.",
                "max_tokens",
                "context_length_exceeded",
            )
        if params.max_tokens < (0 if params.prompt_logprobs is not None else 1):
            raise ClientError("max_tokens must be at least 1 (0 only to score the prompt).", "max_tokens")
        if any(not 0 <= token_id < self.vocab_size for token_id, _ in params.logit_bias):
            raise ClientError(f"logit_bias: token ids must lie in [0, {self.vocab_size}).", "logit_bias")
        if params.seed is not None and not _SEED_RANGE[0] <= params.seed <= _SEED_RANGE[1]:
            raise ClientError(f"seed must be from {_SEED_RANGE[0]} to {_SEED_RANGE[1]}.", "seed", "invalid_value")
        request = Request(f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}", list(prompt_ids), params, adapters=adapters)
        request.cache_salt = _cache_salt(adapters, router)
        if router is not None:
            request.router, request.routed = router, torch.zeros(len(adapters))
        if params.grammar is not None:
            request.grammar = GrammarState(params.grammar, self.vocab_size)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        elif not params.greedy:
            request.generator = torch.Generator(device=self.device)
            request.generator.seed()
        outputs: asyncio.Queue = asyncio.Queue()
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, params.min_tokens)
        stream = _Stream(request, detokenizer, asyncio.get_running_loop(), outputs, streaming, on_finish)
        with self._lock:  # counted last: nothing after this can refuse the request
            if not self._accepting:
                raise EngineUnavailable("The server is not accepting requests (starting up or shutting down).")
            if self._unfinished - self._running >= self.config.max_waiting:
                self.metrics.rejected.inc()
                raise EngineBusy(f"Too many requests are waiting (limit {self.config.max_waiting}); retry later.")
            self._unfinished += 1
            self._inbox.put(_Add(stream))  # under the lock, so a stopping loop sees every request it took
        return RequestHandle(self, request.request_id, outputs)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def forget_adapter(self, adapter_id: str, keep_version: int | None = None) -> None:
        """Free the memory an adapter's deleted or replaced versions hold (see `AdapterSlots.forget`)."""
        self._inbox.put(_Forget(adapter_id, keep_version))

    def set_threads(self, threads: int) -> None:
        """Compute with this many CPU threads from the next step on (torch's setting is per thread,
        so the engine thread itself applies it)."""
        self._inbox.put(_SetThreads(threads))

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stop taking requests, let the running ones finish (up to a limit), then end `run`."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_seconds
        while self._unfinished and time.monotonic() < deadline and self.failure is None:
            time.sleep(0.05)
        self._stopping = True
        self._inbox.put(_Wake())

    # --- the engine's side ---

    def _loop(self) -> None:
        # Block on the inbox only when the last step ran nothing: then no step can run until a
        # message arrives (a request, an abort, an adapter read finishing, a stop).
        idle = True
        while not self._stopping:
            self._read_inbox(block=idle)
            if self._stopping:
                break
            before = (self.scheduler.num_preemptions, self.scheduler.prefix_queries, self.scheduler.prefix_hits)
            chunks = self.scheduler.schedule()
            self.metrics.preemptions.inc(self.scheduler.num_preemptions - before[0])
            self.metrics.prefix_cache_queries.inc(self.scheduler.prefix_queries - before[1])
            self.metrics.prefix_cache_hits.inc(self.scheduler.prefix_hits - before[2])
            if chunks:
                self._step(chunks)
            idle = not chunks
            with self._lock:
                self._running = len(self.scheduler.running)
            self._update_gauges()
        for stream in list(self._streams.values()):
            self._finish(stream, FinishReason.ABORT, error="the server shut down")
        for stream in self._unread_requests():
            self._abandon(stream, "the server shut down", FinishReason.ABORT)

    def _unread_requests(self) -> list[_Stream]:
        """Requests still in the inbox once the loop has stopped reading it (taken in before it stopped)."""
        streams = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return streams
            if isinstance(message, _Add):
                self._streams[message.stream.request.request_id] = message.stream
                streams.append(message.stream)

    def _read_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._handle(message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, message: _Message) -> None:
        match message:
            case _Add(stream):
                self._streams[stream.request.request_id] = stream
                self.scheduler.add(stream.request)
            case _Abort(request_id):
                stream = self._streams.get(request_id)
                if stream is not None:
                    self._finish(stream, FinishReason.ABORT)
            case _Forget(adapter_id, keep_version):
                if self.adapter_slots is not None:
                    self.adapter_slots.forget(adapter_id, keep_version)
            case _SetThreads(threads):
                torch.set_num_threads(threads)
            case _Wake():
                pass

    def _step(self, chunks: list[ScheduledChunk]) -> None:
        self.metrics.batch_tokens.observe(sum(c.num_new for c in chunks))
        try:
            step = self.runner.run(chunks)
        except Exception as exc:  # a failed step fails its requests, never the engine
            log.exception("forward pass failed")
            for c in chunks:
                self._finish(self._streams[c.request.request_id], FinishReason.ERROR, error=str(exc))
            return
        for c, rows in zip(chunks, step.chunks, strict=True):
            req = c.request
            self.scheduler.computed(req, c.stop)
            stream = self._streams[req.request_id]
            try:
                if rows.scored:
                    self._score_prompt(req, rows.scored, step.logits[rows.scored_rows])
                if rows.sample_row is None:
                    continue
                if req.params.max_tokens == 0:  # the prompt was only to be scored
                    self._finish(stream, FinishReason.LENGTH)
                else:
                    self._accept_token(stream, sample(step.logits[rows.sample_row], req, self.stop_token_ids))
            except Exception as exc:  # this request's scoring, sampling or stop check failed: it ends alone
                log.warning("request %s failed: %s", req.request_id, exc)
                self._finish(stream, FinishReason.ERROR, error=str(exc))

    def _score_prompt(self, req: Request, positions: range, logits: torch.Tensor) -> None:
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("the model's output for this prompt is not finite (NaN or infinity)")
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = [req.prompt_ids[p + 1] for p in positions]
        chosen = logprobs[torch.arange(len(targets)), torch.tensor(targets)].tolist()
        for i, (token_id, logprob) in enumerate(zip(targets, chosen, strict=True)):
            req.prompt_logprobs.append(
                TokenLogprob(token_id, logprob, top_logprobs(logprobs[i], req.params.prompt_logprobs))
            )

    def _accept_token(self, stream: _Stream, token: TokenLogprob) -> None:
        req = stream.request
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.time_to_first_token.observe(now - req.arrival)
        req.output_ids.append(token.token_id)
        self.metrics.generation_tokens.inc()
        if req.grammar is not None:
            req.grammar.accept(token.token_id)
        finish = None
        ends_grammar = req.grammar is not None and req.grammar.finished
        if ends_grammar or (token.token_id in self.stop_token_ids and not req.params.ignore_eos):
            finish, text = FinishReason.STOP, stream.detokenizer.flush()
        else:
            text = stream.detokenizer.push(token.token_id)
            if stream.detokenizer.stopped:
                finish = FinishReason.STOP
            elif len(req.output_ids) >= req.params.max_tokens:
                finish = FinishReason.LENGTH
                text += stream.detokenizer.flush()
        logprobs = (token,) if req.params.top_logprobs is not None else ()
        if finish is None:
            stream.emit(
                RequestOutput(text, (token.token_id,), logprobs, prompt_logprobs=self._new_prompt_logprobs(req))
            )
        else:
            self._finish(stream, finish, text=text, token_ids=(token.token_id,), logprobs=logprobs)

    def _finish(
        self, stream: _Stream, reason: FinishReason, text: str = "", token_ids=(), logprobs=(), error: str | None = None
    ) -> None:
        req = stream.request
        req.finish_reason = reason
        self.scheduler.remove(req)
        self.metrics.requests.labels(reason.value).inc()
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.first_token_at is not None:
            now = time.monotonic()
            self.metrics.request_latency.observe(now - req.arrival)
            if len(req.output_ids) > 1:
                self.metrics.time_per_output_token.observe((now - req.first_token_at) / (len(req.output_ids) - 1))
        output = RequestOutput(
            text,
            tuple(token_ids),
            tuple(logprobs),
            reason,
            len(req.prompt_ids),
            len(req.output_ids),
            error,
            req.routing,
            self._new_prompt_logprobs(req),
            req.cached_tokens or 0,
        )
        self._close(stream, output)

    @staticmethod
    def _new_prompt_logprobs(req: Request) -> tuple[TokenLogprob, ...] | None:
        """The prompt's logprobs, on the first output once they are all there (once)."""
        done = len(req.prompt_logprobs) == len(req.prompt_ids) - 1
        if req.params.prompt_logprobs is None or req.prompt_logprobs_sent or not done:
            return None
        req.prompt_logprobs_sent = True
        return tuple(req.prompt_logprobs)

    def _abandon(self, stream: _Stream, error: str, reason: FinishReason = FinishReason.ERROR) -> None:
        """End a request without touching the scheduler, whose state may be what failed."""
        stream.request.finish_reason = reason
        output = RequestOutput("", (), (), reason, len(stream.request.prompt_ids), 0, error)
        self._close(stream, output)

    def _close(self, stream: _Stream, output: RequestOutput) -> None:
        """Forget a finished request, then tell its caller: whoever sees the end sees it released."""
        del self._streams[stream.request.request_id]
        with self._lock:
            self._unfinished -= 1
        if stream.on_finish is not None:
            try:
                stream.on_finish()
            except Exception:
                log.exception("request %s: on_finish failed", stream.request.request_id)
        stream.emit(output)

    def _acquire_adapters(self, req: Request) -> bool:
        """Pin device slots for all of a request's adapters, or none of them."""
        for key, _ in req.adapters:
            slot = self.adapter_slots.acquire(key)
            if slot is None:
                self._release_adapters(req)
                reason = self.adapter_slots.failure(key)
                if reason is not None:
                    self._finish(self._streams[req.request_id], FinishReason.ERROR, error=reason)
                return False
            req.slots.append(slot)
        return True

    def _release_adapters(self, req: Request) -> None:
        for slot in req.slots:
            self.adapter_slots.release(slot)
        req.slots = []

    def _adapter_event(self, event: str, adapter_id: str) -> None:
        counter = self.metrics.adapter_loads if event == "load" else self.metrics.adapter_evictions
        counter.labels(adapter_id).inc()

    def _update_gauges(self) -> None:
        self.metrics.set_load(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.kv_cache.allocator.num_used,
            self.kv_cache.allocator.num_blocks,
        )
        if self.adapter_slots is not None:
            self.metrics.adapters_resident.set(len(self.adapter_slots.resident()))
            self.metrics.set_requests_by_adapter(
                [r.adapters for r in self.scheduler.running],
                [r.adapters for r in self.scheduler.waiting],
                self.adapter_slots.num_slots,
            )


class RequestHandle:
    """The caller's end of one request: iterate its outputs; `close` it when the client goes.

    Closing an unfinished request aborts it in the engine. The handle also closes itself when
    dropped, which covers a caller cancelled before it ever started reading.
    """

    def __init__(self, engine: Engine, request_id: str, outputs: asyncio.Queue):
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._outputs.get()
                self.finished = out.finish_reason is not None
                yield out
        finally:
            self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    __del__ = close


def _cache_salt(adapters: tuple[tuple[SlotKey, float], ...], router: Router | None) -> bytes | None:
    """What besides its tokens shapes a request's keys and values: its adapters and weights, and a
    routed fusion's router. None (nothing shared) for a router that cannot say what it is."""
    identity = None
    if router is not None:
        identity = getattr(router, "identity", None)
        if identity is None:
            return None
    return hashlib.sha256(repr((adapters, identity)).encode()).digest()


# Rotary scalings whose frequencies depend on the longest position in the forward pass: in a
# flattened batch, one long sequence would change every other sequence's.
_POSITION_DEPENDENT_ROPE = frozenset({"longrope", "dynamic"})


def _context_limit(mc) -> int | None:
    """The longest sequence the model computes as it would alone: its `max_position_embeddings`,
    or with LongRoPE (Phi-3.5, Phi-4-mini) or dynamic NTK scaling its original context length,
    within which every sequence uses the same rotary frequencies whatever else is in the batch."""
    rope = getattr(mc, "rope_parameters", None) or getattr(mc, "rope_scaling", None) or {}
    per_layer_type = rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    kinds = {r.get("rope_type") or r.get("type") for r in per_layer_type}
    original = getattr(mc, "original_max_position_embeddings", None) or next(
        (r["original_max_position_embeddings"] for r in per_layer_type if "original_max_position_embeddings" in r),
        None,
    )
    if kinds & _POSITION_DEPENDENT_ROPE and original:
        return original
    return getattr(mc, "max_position_embeddings", None)


def _stop_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
