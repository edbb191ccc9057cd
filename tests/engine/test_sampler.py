"""The sampler on its own: each adjustment of the logits does what it says, and logprobs stay the
model's own whatever the adjustments."""

from __future__ import annotations

import pytest
import torch

from plait.server.engine.request import Request, SamplingParams
from plait.server.engine.sampler import NonFiniteLogits, sample

VOCAB = 16
EOS = 15


def _request(output: list[int] = (), prompt: list[int] = (0,), seed: int | None = 0, **params) -> Request:
    request = Request("r", list(prompt), SamplingParams(max_tokens=10, **params))
    request.output_ids = list(output)
    if seed is not None:
        request.generator = torch.Generator().manual_seed(seed)
    return request


def _row(best: int = 3) -> torch.Tensor:
    row = torch.linspace(-2.0, 2.0, VOCAB)
    row[best] = 5.0
    return row


def test_greedy_picks_the_best_and_logprobs_are_the_models():
    token = sample(_row(), _request(temperature=0, top_logprobs=2))
    expected = torch.log_softmax(_row(), -1)
    assert token.token_id == 3 and token.logprob == pytest.approx(float(expected[3]))
    assert [t for t, _ in token.top] == [3, VOCAB - 1]


def test_logit_bias_bans_and_forces():
    assert sample(_row(), _request(temperature=0, logit_bias=((3, -100.0),))).token_id != 3
    for seed in range(20):
        forced = sample(_row(), _request(seed=seed, temperature=1.0, logit_bias=((7, 100.0),)))
        assert forced.token_id == 7
        assert forced.logprob == pytest.approx(float(torch.log_softmax(_row(), -1)[7]))  # the model's, unbiased


def test_penalties_push_away_from_what_was_said():
    # Token 3 leads by 5 - 2 = 3 logits over the runner-up (15); said twice, a frequency penalty of 2 removes 4.
    assert sample(_row(), _request(output=[3, 3], temperature=0, frequency_penalty=2.0)).token_id == VOCAB - 1
    assert sample(_row(), _request(output=[3, 3], temperature=0, frequency_penalty=1.0)).token_id == 3
    assert sample(_row(), _request(output=[3], temperature=0, presence_penalty=2.0)).token_id == 3
    assert sample(_row(), _request(output=[3, 3, 3], temperature=0, presence_penalty=-2.0)).token_id == 3
    # Repetition penalty divides positive logits of tokens in the prompt or the output.
    assert sample(_row(), _request(prompt=[3], temperature=0, repetition_penalty=3.0)).token_id == VOCAB - 1
    assert sample(_row(), _request(prompt=[4], temperature=0, repetition_penalty=3.0)).token_id == 3


def test_min_tokens_holds_back_the_stop_tokens():
    row = _row(best=EOS)
    assert sample(row, _request(output=[1], temperature=0, min_tokens=2), stop_token_ids=[EOS]).token_id != EOS
    assert sample(row, _request(output=[1, 2], temperature=0, min_tokens=2), stop_token_ids=[EOS]).token_id == EOS


def test_top_k_min_p_and_top_p_cut_the_tail():
    flat = torch.zeros(VOCAB)
    flat[:4] = torch.tensor([4.0, 3.9, 3.8, 3.7])
    seen_k = {sample(flat, _request(seed=s, top_k=2)).token_id for s in range(200)}
    assert seen_k == {0, 1}
    seen_p = {sample(flat, _request(seed=s, min_p=0.95)).token_id for s in range(200)}
    assert seen_p <= {0, 1} and 0 in seen_p
    seen_all = {sample(flat, _request(seed=s)).token_id for s in range(300)}
    assert len(seen_all) > 4  # without cuts the tail is sampled too
    top_p = {sample(flat, _request(seed=s, top_p=0.3)).token_id for s in range(200)}
    assert top_p <= {0, 1, 2} and len(top_p) >= 2


def test_a_tiny_temperature_is_greedy_and_non_finite_logits_are_refused():
    assert sample(_row(), _request(temperature=1e-300)).token_id == 3
    bad = _row()
    bad[5] = float("nan")
    with pytest.raises(NonFiniteLogits):
        sample(bad, _request())
