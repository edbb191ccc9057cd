"""Picking the next token from a row of logits: greedy, or temperature with nucleus (top-p).

Logprobs are reported under the model's own distribution (before temperature and top-p),
as OpenAI does, so they mean the same whatever the sampling settings.
"""

from __future__ import annotations

import torch

from plait.server.engine.request import Request, SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, requests: list[Request]) -> list[TokenLogprob]:
    """One token for each request, from its row of `logits` ([N, vocab], float32)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = [_pick(logits[i], r.params, r.generator) for i, r in enumerate(requests)]
    result = []
    for i, (token, r) in enumerate(zip(picked, requests, strict=True)):
        top: tuple[tuple[int, float], ...] = ()
        if r.params.top_logprobs:
            values, ids = logprobs[i].topk(r.params.top_logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        result.append(TokenLogprob(token, float(logprobs[i, token]), top))
    return result


def _pick(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.greedy:
        return int(row.argmax())
    probs = torch.softmax(row / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
