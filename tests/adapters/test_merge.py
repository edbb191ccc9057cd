"""TIES and DARE merges against PEFT's own: the merged deltas and the logits they give.

Adapters of different ranks and targets are made by PEFT on a small float32 Llama, so the
comparison is exact up to float32 rounding and SVD.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.adapters.merge import MergeSpec, merge_adapters
from plait.server.engine.lora import LoRALayers

ADAPTERS = {
    "attn4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all12": LoraConfig(r=12, lora_alpha=6, target_modules="all-linear", use_rslora=True),
    "qgate8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "gate_proj"]),
}
WEIGHTS = [0.7, -0.4, 1.3]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base, a PeftModel holding every adapter, and Plait's reading of each."""
    folder = tmp_path_factory.mktemp("merge")
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
    targets = base_lora_targets(base)
    names = list(ADAPTERS)
    peft = get_peft_model(copy.deepcopy(base), ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, ADAPTERS[name])
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(folder, selected_adapters=names)
    ours = [read_adapter(folder / name, targets, 64) for name in names]
    return base, peft.eval(), targets, ours


def _delta(weights) -> torch.Tensor:
    return weights.scale * weights.b.float() @ weights.a.float()


@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_equals_peft_ties_svd(made, density, sign):
    _, peft, targets, ours = made
    name = f"ties_{int(density * 10)}_{sign}"
    peft.add_weighted_adapter(
        list(ADAPTERS), WEIGHTS, name, combination_type="ties_svd", density=density, majority_sign_method=sign
    )
    merged = merge_adapters(list(zip(ours, WEIGHTS, strict=True)), MergeSpec("ties", density, sign), targets)
    # Every module some member adapts, at the largest member rank, as PEFT makes it.
    assert set(merged.modules) == {p for p in targets if any(p in a.modules for a in ours)}
    assert merged.rank == 12
    for path, weights in merged.modules.items():
        want = peft.base_model.model.get_submodule(path).get_delta_weight(name)
        torch.testing.assert_close(_delta(weights), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_draws_what_peft_draws_for_the_same_seed(made, method):
    """PEFT's `add_weighted_adapter` spends random draws initialising the new adapter, so its
    DARE masks cannot be replayed; its merge functions can, module by module in model order."""
    _, peft, targets, ours = made
    merged = merge_adapters(list(zip(ours, WEIGHTS, strict=True)), MergeSpec(method, density=0.6, seed=5), targets)
    torch.manual_seed(5)
    for path in targets:
        present = [i for i, a in enumerate(ours) if path in a.modules]
        if not present:
            continue
        deltas = [_delta(ours[i].modules[path]) for i in present]
        combined = getattr(merge_utils, method)(deltas, torch.tensor([WEIGHTS[i] for i in present]), 0.6)
        u, s, vh = torch.linalg.svd(combined)
        want = (u[:, :12] * s[:12]) @ vh[:12]
        torch.testing.assert_close(_delta(merged.modules[path]), want, atol=1e-5, rtol=1e-4)
    # Another seed drops other entries.
    other = merge_adapters(list(zip(ours, WEIGHTS, strict=True)), MergeSpec(method, density=0.6, seed=6), targets)
    path = next(iter(merged.modules))
    assert not torch.allclose(_delta(merged.modules[path]), _delta(other.modules[path]))


def test_merged_adapter_in_the_engine_gives_peft_logits(made):
    base, peft, targets, ours = made
    peft.add_weighted_adapter(
        ["attn4", "all12"], [1.0, 0.5], "ties_logits", combination_type="ties_svd", density=0.5, svd_rank=6
    )
    merged = merge_adapters([(ours[0], 1.0), (ours[1], 0.5)], MergeSpec("ties", density=0.5, rank=6), targets)
    model = copy.deepcopy(base)
    layers = LoRALayers(model, targets, num_slots=1, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    layers.load(0, merged.modules)
    layers.set_segments([7], [0])
    ids = torch.randint(0, 128, (1, 7))
    with torch.inference_mode():
        got = model(ids).logits
        peft.set_adapter("ties_logits")
        want = peft(ids).logits
        bare = base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - bare).abs().max() > 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="average"), "unknown merge method"),
        (dict(method="ties", density=0.0), "density"),
        (dict(method="dare_linear", density=1.5), "density"),
        (dict(method="ties", rank=0), "rank"),
    ],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeSpec(**kwargs)
