"""The engine's LoRA path against PEFT on the same NF4 base: every adapter, one shared batch.

Adapters are made by PEFT itself (random non-zero weights, different ranks and targets),
read by Plait's adapter reader and served by the engine in one mixed batch together with
the bare base model. PEFT's `PeftModel` then scores the very tokens the engine chose.
"""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.base_model import load_nf4_model, load_tokenizer, resolve_model
from plait.server.engine import ATTENTION_NAME, AdapterKey, Engine, EngineConfig, LoRAConfig, SamplingParams
from plait.server.engine.lora import LoRALayers
from plait.server.metrics import Metrics

# Logprobs of the chosen tokens, engine against PEFT. Both run bitsandbytes' CPU NF4 kernel,
# which rounds activations to bf16 with a tiling that depends on the batch's shape: the bare
# base model alone differs from itself by up to 0.07 nats between a batch and a lone run,
# and 30 layers of adapter deltas amplify that (measured: up to 0.17, mean 0.07 per answer).
# On unquantized float32 weights the LoRA layers equal PEFT exactly (the test below).
LOGPROB_MAX_ATOL = 0.3
LOGPROB_MEAN_ATOL = 0.1
ADAPTERS = {
    "rank4-attn": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rank16-all": dict(r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "rank8-mlp": dict(
        r=8,
        lora_alpha=32,
        target_modules=["gate_proj", "down_proj"],
        rank_pattern={"down_proj": 12},
        alpha_pattern={"down_proj": 48},
    ),
}
PROMPTS = ["The capital of France is", "My favourite colour is", "Water boils at"]
NEW_TOKENS = 6
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """Every adapter made and saved by PEFT on the NF4 base the server loads; the same
    `PeftModel` then scores the engine's answers."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    base = load_nf4_model(resolve_model(None), torch.device("cpu"))
    names = list(ADAPTERS)
    peft = get_peft_model(base, _config(names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, _config(name))
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # PEFT starts B at zero: make every delta count
            torch.nn.init.normal_(p, std=0.04)
    peft.save_pretrained(root, selected_adapters=names)
    peft.eval()
    return root, peft


def _config(name: str) -> LoraConfig:
    return LoraConfig(**ADAPTERS[name], lora_dropout=0.0, task_type="CAUSAL_LM")


def _engine_outputs(folder):
    spec = resolve_model(None)
    tok = load_tokenizer(spec)
    model = load_nf4_model(spec, torch.device("cpu"), DTYPE, attn_implementation=ATTENTION_NAME)
    targets = base_lora_targets(model)
    lora = LoRAConfig(
        targets=targets,
        load=lambda key: read_adapter(folder / key.adapter_id, targets, 64),
        max_device_adapters=2,
        max_cpu_adapters=2,
    )
    engine = Engine(model, tok, EngineConfig(), torch.device("cpu"), Metrics(), lora)
    runner = threading.Thread(target=engine.run)
    runner.start()

    async def one(prompt, adapter):
        adapters = ((AdapterKey(adapter, 1), 1.0),) if adapter else ()
        handle = engine.submit(
            tok.encode(prompt),
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0, top_logprobs=0, ignore_eos=True),
            adapters=adapters,
        )
        outs = [o async for o in handle.outputs()]
        return outs[-1]

    async def all_at_once():
        jobs = [(p, a) for a in [None, *ADAPTERS] for p in PROMPTS]
        return dict(zip(jobs, await asyncio.gather(*(one(p, a) for p, a in jobs)), strict=True))

    try:
        results = asyncio.run(all_at_once())
    finally:
        engine.shutdown(drain_seconds=0)
        runner.join()
    return results, tok, engine


def test_mixed_batch_matches_peft_for_every_adapter(peft_adapters, peft_logprobs):
    folder, peft = peft_adapters
    results, tok, engine = _engine_outputs(folder)
    # More adapters than device slots: some were evicted and loaded again along the way.
    evictions = [
        engine.metrics.registry.get_sample_value("plait_adapter_evictions_total", {"adapter": a}) for a in ADAPTERS
    ]
    assert sum(e or 0 for e in evictions) > 0
    effect = dict.fromkeys(ADAPTERS, 0.0)
    for (prompt, adapter), out in results.items():
        assert out.error is None and len(out.token_ids) == NEW_TOKENS
        prompt_ids = tok.encode(prompt)
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        base_scores = peft_logprobs(peft, None, prompt_ids, out.token_ids)
        expected = base_scores if adapter is None else peft_logprobs(peft, adapter, prompt_ids, out.token_ids)
        diff = (got - expected).abs()
        assert diff.max() < LOGPROB_MAX_ATOL and diff.mean() < LOGPROB_MEAN_ATOL, (prompt, adapter, got, expected)
        if adapter is not None:
            effect[adapter] = max(effect[adapter], float((got - base_scores).abs().max()))
    # Every adapter moves the logprobs by more than the tolerance, so the agreement above
    # could not come from serving the bare base model instead.
    assert all(e > LOGPROB_MAX_ATOL for e in effect.values()), effect


def test_lora_layers_equal_peft_exactly_in_float32(tmp_path):
    """Without quantization noise: one batch of three segments (two adapters and the bare
    base, plus a weighted mix of both) gives PEFT's logits to float32 rounding."""
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    base = LlamaForCausalLM(config).eval()
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a"
    )
    peft.add_adapter("b", LoraConfig(r=12, lora_alpha=6, target_modules="all-linear", use_rslora=True))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    peft.eval()

    ours = copy.deepcopy(base)
    targets = base_lora_targets(ours)
    layers = LoRALayers(ours, targets, num_slots=3, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    layers.load(2, read_adapter(tmp_path / "a", targets, 16).modules)
    layers.load(0, read_adapter(tmp_path / "b", targets, 16).modules)
    ids = torch.randint(0, 128, (1, 5))
    layers.set_segments([5], [2])
    with torch.inference_mode():
        got_a = ours(ids).logits
        peft.set_adapter("a")
        want_a = peft(ids).logits
        layers.set_segments([5], [[(2, 0.25), (0, 1.5)]])
        got_mix = ours(ids).logits
        layers.set_segments([5], [-1])
        got_base = ours(ids).logits
        with peft.disable_adapter():
            want_base = peft(ids).logits
    torch.testing.assert_close(got_a, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_base, want_base, atol=1e-5, rtol=1e-5)
    # The weighted mix is PEFT's `cat` combination: the weighted sum of full deltas.
    peft.add_weighted_adapter(["a", "b"], [0.25, 1.5], "mix", combination_type="cat")
    peft.set_adapter("mix")
    with torch.inference_mode():
        want_mix = peft(ids).logits
    torch.testing.assert_close(got_mix, want_mix, atol=1e-4, rtol=1e-4)
    assert (got_mix - got_base).abs().max() > 0.1
