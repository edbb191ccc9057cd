"""The base model: folders it loads (full precision, saved in 4 bits, sharded) and refuses, and
on the CPU, NF4 weights kept dequantized are exactly the NF4 values."""

from __future__ import annotations

import json
import re

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open

from plait.server import base_model
from plait.server.base_model import DequantizedLinear, load_nf4_model, prepare_cpu_weights, resolve_model


@pytest.fixture(scope="module")
def spec():
    return resolve_model(None)


def _nf4_layers(model) -> dict[str, bnb.nn.Linear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_dequantized_weights_are_the_nf4_values_and_answer_alike(spec):
    nf4 = load_nf4_model(spec, torch.device("cpu"))
    dense = load_nf4_model(spec, torch.device("cpu"))
    layers = _nf4_layers(dense)
    expected = {
        n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(torch.bfloat16)
        for n, m in layers.items()
    }
    assert prepare_cpu_weights(dense, "dequantized") == "dequantized"
    assert not _nf4_layers(dense)
    for name, weight in expected.items():
        layer = dense.get_submodule(name)
        assert isinstance(layer, DequantizedLinear) and layer.nf4_forward is None
        assert torch.equal(layer.weight, weight)
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 7042, 30, 198, 504, 966, 282, 260, 1517, 314]])
    with torch.inference_mode():
        a, b = torch.log_softmax(nf4(ids).logits.float(), -1), torch.log_softmax(dense(ids).logits.float(), -1)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # The same distributions, but for bf16 kernels that add up in another order.
    kl = (a.exp() * (a - b)).sum(-1)
    assert kl.max() < 0.02, kl
    # Once bitsandbytes has repacked its layers for its own kernel, it is too late.
    if bnb.functional.has_avx512bf16():
        with pytest.raises(RuntimeError, match="before the model's first forward pass"):
            prepare_cpu_weights(nf4, "dequantized")


def test_auto_keeps_both_where_bitsandbytes_has_a_fast_kernel_and_only_if_memory_allows(spec, monkeypatch):
    model = load_nf4_model(spec, torch.device("cpu"))
    monkeypatch.setattr(base_model, "_available_memory", lambda: 1 << 20)  # 1 MiB free: too little
    assert prepare_cpu_weights(model, "auto") == "nf4" and _nf4_layers(model)
    monkeypatch.undo()
    fast_kernel = bool(bnb.functional.has_avx512bf16())
    assert prepare_cpu_weights(model, "auto") == ("both" if fast_kernel else "dequantized")
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert (layer.nf4_forward is not None) == fast_kernel
    assert not [n for n, m in model.named_modules() if n.startswith("model.layers.0.mlp.down_proj.")]
    assert prepare_cpu_weights(load_nf4_model(spec, torch.device("cpu")), "nf4") == "nf4"
    with pytest.raises(ValueError):
        prepare_cpu_weights(model, "fast")


def test_the_fastest_dtype_is_measured_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path))
    timed = []

    def seconds(dtype):
        timed.append(dtype)
        return {torch.bfloat16: 0.9, torch.float32: 0.1}[dtype]  # a CPU that only emulates bf16

    monkeypatch.setattr(base_model, "_matmul_seconds", seconds)
    assert base_model.fastest_dtype(torch.device("cpu")) == torch.float32
    assert base_model.fastest_dtype(torch.device("cpu")) == torch.float32
    assert timed == [torch.bfloat16, torch.float32]  # measured once
    assert "float32" in (tmp_path / "fastest_dtype.json").read_text()


def _logits(model, ids=((504, 3458, 282, 4649, 314, 7042, 30, 198, 504, 966),)) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor(ids)).logits


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_folder_saved_in_4bit_loads_as_it_is(tiny_architecture, tmp_path, quant_type):
    """As Unsloth's `*-bnb-4bit` folders: the saved 4-bit weights, not a new quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    original = tiny_architecture("llama")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype="bfloat16"
    )
    saved = AutoModelForCausalLM.from_pretrained(original, quantization_config=quantization, dtype=torch.float32)
    saved.save_pretrained(tmp_path / "bnb-4bit")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bnb-4bit" / name).write_bytes((original / name).read_bytes())
    with safe_open(tmp_path / "bnb-4bit" / "model.safetensors", "pt") as f:
        assert any(k.endswith(f"weight.quant_state.bitsandbytes__{quant_type}") for k in f.keys())  # noqa: SIM118

    loaded = load_nf4_model(resolve_model(str(tmp_path / "bnb-4bit")), torch.device("cpu"), torch.float32)
    layers = _nf4_layers(loaded)
    assert layers and {m.weight.quant_type for m in layers.values()} == {quant_type}
    assert {m.compute_dtype for m in layers.values()} == {torch.float32}  # Plait's dtype, not the folder's
    for name, layer in _nf4_layers(saved).items():
        layer.compute_dtype = torch.float32
        assert torch.equal(
            bnb.functional.dequantize_4bit(layers[name].weight.data, layers[name].weight.quant_state),
            bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
        ), name
    torch.testing.assert_close(_logits(loaded), _logits(saved))


def test_sharded_weights_load_as_one_folder(tiny_architecture, tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_architecture("qwen3")
    AutoModelForCausalLM.from_pretrained(original).save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((original / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    whole = load_nf4_model(resolve_model(str(original)), torch.device("cpu"), torch.float32)
    sharded = load_nf4_model(resolve_model(str(tmp_path / "sharded")), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(_logits(sharded), _logits(whole), atol=0, rtol=0)


def _folder(tmp_path, config: dict, weights: str = "model.safetensors"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / weights).write_bytes(b"")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        ({"model_type": "llama"}, "pytorch_model.bin", "no .safetensors weights (pickled weights are never loaded)"),
        ({"model_type": "gemma3"}, "model.safetensors", "vision tower"),
        ({"model_type": "mixtral"}, "model.safetensors", "mixture-of-experts"),
        ({"model_type": "gpt2"}, "model.safetensors", "unsupported model type 'gpt2'"),
        (
            {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
            "model.safetensors",
            "bitsandbytes 8-bit",
        ),
        ({"model_type": "qwen2", "quantization_config": {"quant_method": "awq"}}, "model.safetensors", "with awq"),
    ],
)
def test_folders_it_cannot_serve_are_refused_in_one_line(tmp_path, config, weights, message):
    with pytest.raises(base_model.ModelLoadError, match=re.escape(message)) as refused:
        resolve_model(_folder(tmp_path / "model", config, weights))
    assert "\n" not in str(refused.value)
