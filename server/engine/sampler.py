"""Picking the next token from a row of logits: greedy, or temperature with nucleus (top-p).

Logprobs are reported under the model's own distribution (before temperature and top-p),
as OpenAI does, so they mean the same whatever the sampling settings. A row that is not
finite (an adapter with huge weights can overflow the activations) is refused with
`NonFiniteLogits` rather than sampled, so the engine fails that request alone.
"""

from __future__ import annotations

import torch

from plait.server.engine.request import Request, SamplingParams, TokenLogprob


class NonFiniteLogits(ValueError):
    pass


def sample(row: torch.Tensor, request: Request) -> TokenLogprob:
    """One token for `request` from its row of logits ([vocab], float32)."""
    if not bool(torch.isfinite(row).all()):
        raise NonFiniteLogits("the model's output for this request is not finite (NaN or infinity)")
    params = request.params
    logprobs = torch.log_softmax(row, dim=-1)
    token = _pick(row, params, request.generator)
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs:
        values, ids = logprobs.topk(params.top_logprobs)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), top)


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
