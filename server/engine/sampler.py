"""Picking the next token from a row of logits, as `SamplingParams` says.

The logits are first adjusted for the request (penalties, logit bias, the ban on stop tokens
before `min_tokens`, a grammar's mask), then the token is picked: greedily, or by temperature
with top-k, min-p and nucleus (top-p) cuts. Logprobs are reported under the model's own
distribution (before any of that), as OpenAI does and vLLM does by default, so they mean the
same whatever the sampling settings. A row that is not finite (an adapter with huge weights
can overflow the activations) is refused with `NonFiniteLogits` rather than sampled, so the
engine fails that request alone.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from plait.server.engine.request import Request, SamplingParams, TokenLogprob


class NonFiniteLogits(ValueError):
    pass


def sample(row: torch.Tensor, request: Request, stop_token_ids: Collection[int] = ()) -> TokenLogprob:
    """One token for `request` from its row of logits ([vocab], float32)."""
    if not bool(torch.isfinite(row).all()):
        raise NonFiniteLogits("the model's output for this request is not finite (NaN or infinity)")
    params = request.params
    logprobs = torch.log_softmax(row, dim=-1)
    if params.adjusts_logits:
        row = _adjusted(row.clone(), request, stop_token_ids)
    token = _pick(row, params, request.generator)
    return TokenLogprob(token, float(logprobs[token]), top_logprobs(logprobs, params.top_logprobs))


def top_logprobs(logprobs: torch.Tensor, k: int | None) -> tuple[tuple[int, float], ...]:
    """The `k` most likely (token id, logprob) pairs of a row of logprobs, most likely first."""
    if not k:
        return ()
    values, ids = logprobs.topk(k)
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


def _adjusted(row: torch.Tensor, request: Request, stop_token_ids: Collection[int]) -> torch.Tensor:
    params = request.params
    if params.repetition_penalty != 1.0:  # vLLM's (from CTRL): on every token of prompt and output
        seen = torch.tensor(sorted({*request.prompt_ids, *request.output_ids}), dtype=torch.long)
        scores = row[seen]
        row[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and request.output_ids:  # OpenAI's: output only
        counts = torch.bincount(torch.tensor(request.output_ids), minlength=row.shape[0])[: row.shape[0]].to(row)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row)
    for token_id, bias in params.logit_bias:
        row[token_id] += bias
    if len(request.output_ids) < params.min_tokens and stop_token_ids:
        row[list(stop_token_ids)] = float("-inf")
    if request.grammar is not None:
        request.grammar.mask(row)
    return row


def _pick(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.greedy:
        return int(row.argmax())
    probs = torch.softmax(row / params.temperature, dim=-1)
    if params.top_k or params.min_p:
        if params.top_k:
            kth = probs.topk(min(params.top_k, probs.shape[0])).values[-1]
            probs = torch.where(probs < kth, 0.0, probs)
        if params.min_p:
            probs = torch.where(probs < params.min_p * probs.max(), 0.0, probs)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
