"""A flattened batch of many sequences gives each the logits it would get alone.

transformers' own Llama code runs the batch; the paged attention function is the only thing
that keeps sequences apart. The reference is the same model with its stock attention, one
sequence at a time. Both use unquantized float32 weights here: bitsandbytes' CPU kernel
rounds activations to bf16 with a tiling that depends on the number of rows, which would
blur exactly the differences this test looks for. (The served NF4 path is checked end to
end by the API tests.)
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from plait.server.base_model import load_tokenizer, resolve_model
from plait.server.engine.attention import ATTENTION_NAME
from plait.server.engine.kv_cache import PagedKVCache
from plait.server.engine.model_runner import ModelRunner
from plait.server.engine.request import Request, SamplingParams, ScheduledChunk

# float32 rounding that depends on the batch's shape stays far below what a sequence seeing
# another's keys, or missing one of its own, would cause (logits of magnitude ~20).
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def models():
    spec = resolve_model(None)

    def load(attn: str):
        return AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32, attn_implementation=attn).eval()

    return load(ATTENTION_NAME), load("sdpa"), load_tokenizer(spec)


def _alone(stock, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return stock(input_ids=torch.tensor([ids])).logits[0].float()


def test_mixed_prefill_chunks_and_decodes_match_lone_runs(models):
    paged, stock, tok = models
    mc = paged.config
    kv = PagedKVCache(
        mc.num_hidden_layers, 32, 4, mc.num_key_value_heads, mc.head_dim, paged.dtype, torch.device("cpu")
    )
    runner = ModelRunner(paged, kv, torch.device("cpu"))
    texts = ["The capital of France is", "Water boils at a temperature of", "Once upon a time in a land far away"]
    reqs = [Request(str(i), tok.encode(t), SamplingParams(max_tokens=8, temperature=0)) for i, t in enumerate(texts)]
    for r in reqs:
        r.block_ids = kv.allocator.allocate(kv.blocks_needed(len(r.prompt_ids) + 4))

    def step(chunks):
        logits = runner.run(chunks).logits
        sampled = [c.request for c in chunks if c.samples]
        for c in chunks:
            c.request.num_computed = c.stop
        for r, row in zip(sampled, logits, strict=True):
            expected = _alone(stock, r.prompt_ids + r.output_ids)[-1]
            assert (row - expected).abs().max() < LOGIT_ATOL
            assert row.argmax() == expected.argmax()
            r.output_ids.append(int(row.argmax()))
        return sampled

    a, b, c = reqs
    # Step 1: a's whole prompt and the first half of b's. Step 2: a decodes, b finishes its
    # prompt in a second chunk, c's whole prompt arrives. Steps 3-5: three decodes together.
    assert step([ScheduledChunk.next_for(a, len(a.prompt_ids)), ScheduledChunk.next_for(b, 3)]) == [a]
    assert step(
        [
            ScheduledChunk.next_for(a, 1),
            ScheduledChunk.next_for(b, len(b.prompt_ids) - 3),
            ScheduledChunk.next_for(c, len(c.prompt_ids)),
        ]
    ) == [a, b, c]
    for _ in range(3):
        assert step([ScheduledChunk.next_for(r, 1) for r in reqs]) == reqs
    assert [len(r.output_ids) for r in reqs] == [5, 4, 4]
