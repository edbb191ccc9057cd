"""The engine: a loop that steps the model while requests come and go.

The HTTP layer lives on an asyncio loop in another thread; the model runs in `Engine.run`,
so a forward pass never blocks the HTTP side (torch releases the GIL while it computes).
Requests and aborts come in through a queue read between steps; each request's outputs go
back to its own asyncio queue on the caller's loop.

`run` belongs on the process's main thread: with torch's OpenMP pool driven from any
other thread, a decode step on 2 CPU cores took 3x as long (measured: 88 ms against 28 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from plait.server.engine.adapter_slots import AdapterKey, AdapterSlots, SlotKey
from plait.server.engine.detokenizer import IncrementalDetokenizer
from plait.server.engine.kv_cache import PagedKVCache
from plait.server.engine.lora import LoRALayers
from plait.server.engine.model_runner import ModelRunner, ScheduledChunk
from plait.server.engine.request import FinishReason, Request, RequestOutput, SamplingParams
from plait.server.engine.routing import Router
from plait.server.engine.sampler import sample
from plait.server.engine.scheduler import Scheduler
from plait.server.metrics import Metrics

log = logging.getLogger("plait.engine")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_tokens: int = 32768
    max_batched_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 256
    max_model_len: int | None = None  # default: the model's own limit, capped by the KV pool


@dataclass(frozen=True)
class LoRAConfig:
    """How the engine serves adapters: device slots, CPU cache, and where adapters come from."""

    targets: dict[str, tuple[int, int]]  # module path -> (in, out) of every LoRA-capable linear layer
    load: Callable[[AdapterKey], object]  # reads an adapter (with .modules) from the store
    max_device_adapters: int = 8
    max_cpu_adapters: int = 32
    max_rank: int = 64


class EngineBusy(Exception):
    """The admission queue is full: the client should retry later (429)."""


class EngineUnavailable(Exception):
    """The engine is not taking requests: starting, draining or stopped (503)."""


class _Stream:
    """Engine-side bookkeeping of one request and the way back to its caller.

    A streaming caller gets every step's output; any other caller only the finished whole,
    so it is woken once per request rather than once per token.
    """

    def __init__(
        self, request: Request, detokenizer: IncrementalDetokenizer, loop, outputs: asyncio.Queue, streaming: bool
    ):
        self.request = request
        self.detokenizer = detokenizer
        self.loop = loop
        self.outputs = outputs
        self.streaming = streaming
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
        model_limit = getattr(mc, "max_position_embeddings", None) or self.kv_cache.capacity_tokens
        self.max_model_len = min(config.max_model_len or model_limit, model_limit, self.kv_cache.capacity_tokens)
        self.adapter_slots: AdapterSlots | None = None
        layers = None
        if lora is not None:
            layers = LoRALayers(model, lora.targets, lora.max_device_adapters, lora.max_rank, model.dtype, device)
            self.adapter_slots = AdapterSlots(
                layers,
                lora.max_cpu_adapters,
                lora.load,
                wake=lambda: self._inbox.put(("wake", None)),
                on_event=self._adapter_event,
            )
        self.runner = ModelRunner(model, self.kv_cache, device, layers)
        self.scheduler = Scheduler(
            self.kv_cache, config.max_batched_tokens, config.max_running, self._acquire_adapters, self._release_adapters
        )
        self.stop_token_ids = _stop_token_ids(model, tokenizer)
        self.metrics.kv_blocks_total.set(num_blocks)

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._unfinished = 0
        self._accepting = False
        self._stopping = False
        self._ids = itertools.count()

    def run(self) -> None:
        """Serve requests on the calling thread until `shutdown`."""
        self._accepting = not self._stopping
        self._loop()

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
    ) -> RequestHandle:
        """Queue a request. Raises EngineBusy past the waiting bound, EngineUnavailable when closed.

        `adapters` are the (adapter, weight) pairs whose deltas the request's tokens get; none
        means the bare base model. A `router` (a fusion's) sets those weights per token and
        layer instead, and the final output reports its average weight per adapter. A
        streaming request's handle yields an output per step; any other's, the whole at the end.
        """
        if adapters and self.adapter_slots is None:
            raise ValueError("this server was started without adapter support")
        if len(adapters) > (self.adapter_slots.num_slots if self.adapter_slots else 0):
            raise ValueError(f"a request may combine at most {self.adapter_slots.num_slots} adapters")
        if not self._accepting:
            raise EngineUnavailable("the server is not accepting requests (starting up or shutting down)")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"{len(prompt_ids)} prompt tokens + {params.max_tokens} max tokens "
                f"exceed the context length {self.max_model_len}"
            )
        with self._lock:
            if self._unfinished - len(self.scheduler.running) >= self.config.max_waiting:
                self.metrics.rejected.inc()
                raise EngineBusy(f"Too many requests are waiting (limit {self.config.max_waiting}); retry later.")
            self._unfinished += 1
        request = Request(f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}", list(prompt_ids), params, adapters=adapters)
        if router is not None:
            if not adapters:
                raise ValueError("a router needs the adapters it routes among")
            request.router, request.routed = router, torch.zeros(len(adapters))
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        elif not params.greedy:
            request.generator = torch.Generator(device=self.device)
            request.generator.seed()
        outputs: asyncio.Queue = asyncio.Queue()
        stream = _Stream(
            request, IncrementalDetokenizer(self.tokenizer, params.stop), asyncio.get_running_loop(), outputs, streaming
        )
        self._inbox.put(("add", stream))
        return RequestHandle(self, request.request_id, outputs)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def forget_adapter(self, adapter_id: str, keep_version: int | None = None) -> None:
        """Free the memory an adapter's deleted or replaced versions hold (see `AdapterSlots.forget`)."""
        self._inbox.put(("forget", (adapter_id, keep_version)))

    def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Stop taking requests, let the running ones finish (up to a limit), then end `run`."""
        self._accepting = False
        deadline = time.monotonic() + drain_seconds
        while self._unfinished and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping = True
        self._inbox.put(("wake", None))

    # --- the engine's side ---

    def _loop(self) -> None:
        while not self._stopping:
            self._read_inbox(block=not self.scheduler.has_work())
            if self._stopping:
                break
            preempted_before = self.scheduler.num_preemptions
            chunks = self.scheduler.schedule()
            self.metrics.preemptions.inc(self.scheduler.num_preemptions - preempted_before)
            if chunks:
                self._step(chunks)
            self._update_gauges()
        for stream in list(self._streams.values()):
            self._finish(stream, FinishReason.ABORT, error="the server shut down")

    def _read_inbox(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._handle(*msg)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            self._streams[payload.request.request_id] = payload
            self.scheduler.add(payload.request)
        elif kind == "abort":
            stream = self._streams.get(payload)
            if stream is not None:
                self._finish(stream, FinishReason.ABORT)
        elif kind == "forget" and self.adapter_slots is not None:
            self.adapter_slots.forget(*payload)

    def _step(self, chunks: list[ScheduledChunk]) -> None:
        self.metrics.batch_tokens.observe(sum(c.num_new for c in chunks))
        try:
            logits = self.runner.run(chunks)
        except Exception as exc:  # a failed step fails its requests, never the engine
            log.exception("forward pass failed")
            for c in chunks:
                self._finish(self._streams[c.request.request_id], FinishReason.ERROR, error=str(exc))
            return
        sampling = []
        for c in chunks:
            c.request.num_computed = c.stop
            if c.samples:
                sampling.append(c.request)
        for req, token in zip(sampling, sample(logits, sampling), strict=True):
            self._accept_token(self._streams[req.request_id], token)

    def _accept_token(self, stream: _Stream, token) -> None:
        req = stream.request
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.time_to_first_token.observe(now - req.arrival)
        req.output_ids.append(token.token_id)
        self.metrics.generation_tokens.inc()
        finish = None
        if token.token_id in self.stop_token_ids and not req.params.ignore_eos:
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
            stream.emit(RequestOutput(text, (token.token_id,), logprobs))
        else:
            self._finish(stream, finish, text=text, token_ids=(token.token_id,), logprobs=logprobs)

    def _finish(
        self, stream: _Stream, reason: FinishReason, text: str = "", token_ids=(), logprobs=(), error: str | None = None
    ) -> None:
        req = stream.request
        req.finish_reason = reason
        self.scheduler.remove(req)
        del self._streams[req.request_id]
        with self._lock:
            self._unfinished -= 1
        self.metrics.requests.labels(reason.value).inc()
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.first_token_at is not None:
            now = time.monotonic()
            self.metrics.request_latency.observe(now - req.arrival)
            if len(req.output_ids) > 1:
                self.metrics.time_per_output_token.observe((now - req.first_token_at) / (len(req.output_ids) - 1))
        stream.emit(
            RequestOutput(
                text,
                tuple(token_ids),
                tuple(logprobs),
                reason,
                len(req.prompt_ids),
                len(req.output_ids),
                error,
                req.routing,
            )
        )

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
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_blocks_used.set(self.kv_cache.allocator.num_used)
        if self.adapter_slots is not None:
            self.metrics.adapters_resident.set(len(self.adapter_slots.resident()))
            self.metrics.set_requests_by_adapter(
                [r.adapters for r in self.scheduler.running], [r.adapters for r in self.scheduler.waiting]
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


def _stop_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
