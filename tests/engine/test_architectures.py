"""Every architecture Plait serves, through the engine, against PEFT on the same NF4 weights.

For each supported `model_type` a tiny random model with the real structure (see
`ARCHITECTURES` in conftest: rope scaling, q/k norms, soft-capping, sliding windows of 8
tokens, fused Phi-3 projections) gets two adapters made by PEFT, one on the attention
projections and one on every linear layer. The engine serves the bare base and both
adapters for three prompts at once, in 4-token blocks and prompt chunks of at most 16
tokens, so sequences run past the window across blocks and chunks; PEFT's `PeftModel` with
transformers' own eager attention then scores each answer alone: every greedy token is
PEFT's greedy token and every logprob PEFT's. Both compute in float32, so they agree to
rounding.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.base_model import SUPPORTED_MODEL_TYPES, load_nf4_model, load_tokenizer, resolve_model
from plait.server.engine import ATTENTION_NAME, AdapterKey, Engine, EngineConfig, LoRAConfig, SamplingParams
from plait.server.metrics import Metrics

CPU = torch.device("cpu")
ATTENTION_TARGETS = {"phi3": ["qkv_proj", "o_proj"]}  # Phi-3's fused projection, as its adapters name it
PROMPT_LENGTHS = (5, 13, 30)  # within, past and well past the 8-token window
NEW_TOKENS = 6
ATOL = 2e-3


@pytest.fixture(scope="module", params=sorted(SUPPORTED_MODEL_TYPES))
def architecture(request, tiny_architecture, tmp_path_factory):
    folder = tiny_architecture(request.param)
    adapters = tmp_path_factory.mktemp(f"{request.param}-adapters")
    torch.manual_seed(0)
    base = load_nf4_model(resolve_model(str(folder)), CPU, torch.float32, attn_implementation="eager")
    attention = ATTENTION_TARGETS.get(request.param, ["q_proj", "v_proj"])
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=attention), adapter_name="attn")
    peft.add_adapter("all", LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True))
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make every delta count
            torch.nn.init.normal_(p, std=0.3)
    peft.save_pretrained(adapters, selected_adapters=["attn", "all"])
    peft.eval()
    return request.param, folder, adapters, peft


def _serve_all_at_once(folder, adapters, prompts):
    spec = resolve_model(str(folder))
    model = load_nf4_model(spec, CPU, torch.float32, attn_implementation=ATTENTION_NAME)
    targets = base_lora_targets(model)
    lora = LoRAConfig(targets=targets, load=lambda key: read_adapter(adapters / key.adapter_id, targets, 16))
    config = EngineConfig(block_size=4, max_batched_tokens=16, kv_cache_tokens=1024)
    engine = Engine(model, load_tokenizer(spec), config, CPU, Metrics(), lora)
    runner = threading.Thread(target=engine.run)
    runner.start()

    async def one(prompt, adapter):
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, top_logprobs=0, ignore_eos=True)
        handle = engine.submit(prompt, params, adapters=((AdapterKey(adapter, 1), 1.0),) if adapter else ())
        return [o async for o in handle.outputs()][-1]

    async def everything():
        jobs = [(i, a) for a in (None, "attn", "all") for i in range(len(prompts))]
        return dict(zip(jobs, await asyncio.gather(*(one(prompts[i], a) for i, a in jobs)), strict=True))

    try:
        return asyncio.run(everything())
    finally:
        engine.shutdown(drain_seconds=0)
        runner.join()


def test_a_mixed_paged_batch_equals_peft_on_each_sequence_alone(
    architecture, tokenizer, peft_logprobs, peft_greedy_margin
):
    model_type, folder, adapters, peft = architecture
    text = "The quick brown fox jumps over the lazy dog while the cat watches from the old wall. " * 3
    ids = tokenizer.encode(text)
    prompts = [ids[i : i + n] for i, n in enumerate(PROMPT_LENGTHS)]
    results = _serve_all_at_once(folder, adapters, prompts)
    moved = dict.fromkeys(("attn", "all"), 0.0)
    for (i, adapter), out in results.items():
        assert out.error is None and len(out.token_ids) == NEW_TOKENS, (model_type, out.error)
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        expected = peft_logprobs(peft, adapter, prompts[i], out.token_ids)
        torch.testing.assert_close(
            got, expected, atol=ATOL, rtol=0, msg=lambda m, where=f"{model_type} {adapter} prompt {i}": f"{where}: {m}"
        )
        assert peft_greedy_margin(peft, adapter, prompts[i], out.token_ids) < ATOL, (model_type, adapter, i)
        if adapter is not None:
            base = peft_logprobs(peft, None, prompts[i], out.token_ids)
            moved[adapter] = max(moved[adapter], float((got - base).abs().max()))
    # Each adapter changes the answers far beyond the tolerance: serving the bare base model
    # instead could not pass.
    assert all(m > 50 * ATOL for m in moved.values()), (model_type, moved)


@pytest.mark.parametrize(
    ("rope", "limit"),
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, 256),
        ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8, "rope_theta": 10000.0}, 32),
    ],
)
def test_longrope_models_are_served_within_their_original_context(tokenizer, rope, limit):
    """LongRoPE picks its frequencies from the longest position in the forward pass, so in a
    flattened batch one long sequence would change the others': Plait stops at the original
    context, where every sequence uses the short factors as it would alone."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_parameters=rope,
    )
    model = Phi3ForCausalLM._from_config(config, attn_implementation=ATTENTION_NAME).eval()
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_tokens=1024), CPU, Metrics())
    assert engine.max_model_len == limit
