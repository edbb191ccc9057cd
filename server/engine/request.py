"""What a generation request asks for, and the engine's running state for it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from plait.kernels import SlotSpec
from plait.server.engine.routing import Router

# Below this temperature, sampling is greedy: dividing logits by a smaller one overflows
# float32 (vLLM draws the same line).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token, in vLLM's terms (OpenAI's fields are a subset).

    Logits are adjusted in this order: repetition penalty (prompt and output tokens), frequency
    and presence penalties (output tokens), logit bias, the ban on stop tokens before
    `min_tokens`, the grammar's mask; then temperature, top-k, min-p and top-p pick the token.
    """

    max_tokens: int  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top k
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's extension
    min_tokens: int = 0  # no stop token, nor stop string, before this many tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: Any = None  # a compiled grammar the output must follow (xgrammar's CompiledGrammar)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.grammar is not None
        )


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request: the text it added, and how it ended if it did."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    routing: tuple[float, ...] | None = None  # a routed fusion's average weight per member, at the end
    # With prompt_logprobs, on the first output: for prompt tokens 1.. (the first has none).
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @classmethod
    def joined(cls, outputs: list[RequestOutput]) -> RequestOutput:
        """Several outputs of one request as one; how it ended comes from the last."""
        last = outputs[-1]
        return cls(
            "".join(o.text for o in outputs),
            tuple(t for o in outputs for t in o.token_ids),
            tuple(lp for o in outputs for lp in o.logprobs),
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.error,
            last.routing,
            next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None),
            last.cached_tokens,
        )


@dataclass(eq=False)
class Request:
    """A sequence as the scheduler and runner see it.

    `num_computed` counts the leading tokens of `prompt_ids + output_ids` whose keys and
    values sit in the KV pool. A preempted request drops its blocks and sets it back to 0:
    it is recomputed from its prompt and the tokens already generated, so nothing a client
    was sent changes.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    # The adapters this request applies, as (adapter key, weight); empty for the bare base.
    adapters: tuple[tuple[object, float], ...] = ()
    # The device slots pinned for them while the request runs, in the same order.
    slots: list[int] = field(default_factory=list)
    # A fusion's router, which reweights those adapters per token and layer; None: fixed weights.
    router: Router | None = None
    # Routing weights given to each adapter, summed over layers and over the tokens whose
    # logits chose this request's output tokens.
    routed: torch.Tensor | None = None
    # With params.grammar: where the output stands in it (engine.grammar.GrammarState).
    grammar: Any = None
    # With params.prompt_logprobs: those found so far, for prompt tokens 1, 2, ... in order.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    # Prefix caching (see kv_cache): what besides the tokens shaped this request's keys and
    # values (None: its blocks are neither looked up nor shared), the hashes of its full blocks
    # so far, how many of its blocks are in the cache, and how many prompt tokens it found there.
    cache_salt: bytes | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_blocks_cached: int = 0
    cached_tokens: int | None = None

    @property
    def routing(self) -> tuple[float, ...] | None:
        """The router's average weight per adapter so far (each token and layer's weights sum to 1)."""
        if self.routed is None or not self.routed.sum():
            return None
        return tuple((self.routed / self.routed.sum()).tolist())

    @property
    def lora(self) -> SlotSpec:
        """What the LoRA layers apply to this request's tokens: -1, a slot, or weighted slots."""
        if not self.slots:
            return -1
        if len(self.slots) == 1 and self.adapters[0][1] == 1.0 and self.router is None:
            return self.slots[0]
        return [(slot, weight) for slot, (_, weight) in zip(self.slots, self.adapters, strict=True)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without copying the whole sequence (called every step)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(start - n, 0) : max(stop - n, 0)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ScheduledChunk:
    """Positions [start, stop) of `request`, computed this step."""

    request: Request
    start: int
    stop: int
    samples: bool  # reaches the end of the sequence, so its last logits pick the next token

    @classmethod
    def next_for(cls, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed
        return cls(request, start, start + num_new, start + num_new == request.num_tokens)

    @property
    def num_new(self) -> int:
        return self.stop - self.start
