"""The base model on the CPU: NF4 weights kept dequantized are exactly the NF4 values, and the
model computes what the NF4 model computes."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

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
