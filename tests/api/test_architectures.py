"""`plait serve --model` on other architectures than the embedded Llama, over HTTP.

Gemma 2 is the hardest case: soft-capped attention and logits, alternating 8-token sliding
windows, and a chat template that refuses a system role. Phi-3 has fused qkv_proj and
gate_up_proj, which its PEFT adapters target. Qwen3's template takes `enable_thinking`.
Each tiny random model (see conftest) is served in float32 with an adapter made by PEFT,
and the answers' logprobs are checked against `PeftModel` with transformers' own eager
attention; and one folder saved in 4 bits, as Unsloth's are, served as it is.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from plait.server.base_model import load_nf4_model, load_tokenizer, resolve_model
from plait.server.fine_tuning.contract import for_template

ADMIN = {"Authorization": "Bearer admin-secret"}
TARGETS = {"gemma2": "all-linear", "phi3": ["qkv_proj", "gate_up_proj"], "qwen3": ["q_proj", "k_proj"]}
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name three colours of the rainbow and say which one comes first."},
]


def _saved_in_4bit(folder, target):
    """The model as Unsloth publishes one: quantized by bitsandbytes and saved so."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization).save_pretrained(target)
    load_tokenizer(resolve_model(str(folder))).save_pretrained(target)
    return target


@pytest.fixture(scope="module", params=[*sorted(TARGETS), "llama-bnb-4bit"])
def served(request, launch_module_server, tiny_architecture, tmp_path_factory):
    if request.param == "llama-bnb-4bit":
        folder = _saved_in_4bit(tiny_architecture("llama"), tmp_path_factory.mktemp("saved") / request.param)
    else:
        folder = tiny_architecture(request.param)
    torch.manual_seed(0)
    base = load_nf4_model(resolve_model(str(folder)), torch.device("cpu"), torch.float32, attn_implementation="eager")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(request.param, "all-linear")))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    adapter = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(adapter)
    peft.eval()
    server = launch_module_server("--model", str(folder), "--dtype", "float32", "--admin-key", "admin-secret")
    with server.http() as http:
        files = [
            ("files", (n, (adapter / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")
        ]
        r = http.post("/v1/adapters", data={"id": "skill"}, files=files, headers=ADMIN)
        assert r.status_code == 201, r.text
    return request.param, folder, server, peft


def test_chats_with_and_without_the_adapter_match_peft(served, peft_logprobs):
    model_type, folder, server, peft = served
    tokenizer = load_tokenizer(resolve_model(str(folder)))
    # Gemma 2's template refuses a system role: the system message is folded into the first
    # user message, as Gemma 3's own template does.
    folded = for_template(MESSAGES, system_role=model_type != "gemma2")
    prompt = tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(prompt) > 16  # past the 8-token window
    moved = 0.0
    with server.http() as http:
        for adapter in (None, "skill"):
            body = {"model": adapter or folder.name, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
            r = http.post(
                "/v1/chat/completions",
                json={**body, "logprobs": True, "ignore_eos": True, "return_tokens_as_token_ids": True},
            )
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["usage"]["prompt_tokens"] == len(prompt)
            content = answer["choices"][0]["logprobs"]["content"]
            ids = [int(t["token"].removeprefix("token_id:")) for t in content]
            got = torch.tensor([t["logprob"] for t in content])
            expected = peft_logprobs(peft, "default" if adapter else None, prompt, ids)
            torch.testing.assert_close(
                got, expected, atol=2e-3, rtol=0, msg=lambda m, where=f"{model_type} {adapter}": f"{where}: {m}"
            )
            if adapter:
                moved = float((got - peft_logprobs(peft, None, prompt, ids)).abs().max())
    assert moved > 0.1


def test_chat_template_kwargs_reach_the_template(served):
    model_type, folder, server, _ = served
    tokenizer = load_tokenizer(resolve_model(str(folder)))
    folded = for_template(MESSAGES, system_role=model_type != "gemma2")
    counts = {}
    with server.http() as http:
        for thinking in (True, False):
            body = {"messages": MESSAGES, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": thinking}}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            counts[thinking] = r.json()["usage"]["prompt_tokens"]
            rendered = tokenizer.apply_chat_template(
                folded, add_generation_prompt=True, return_dict=False, enable_thinking=thinking
            )
            assert counts[thinking] == len(rendered)
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "chat_template_kwargs": {"tools": []}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text
    # Only Qwen3's template has the switch: without thinking, its prompt opens an empty think block.
    assert (counts[False] > counts[True]) == (model_type == "qwen3")
