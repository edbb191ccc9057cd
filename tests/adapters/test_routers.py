"""Routers in the LoRA layers: Arrow against a direct computation and against PEFT's Arrow,
a one-member fusion against its adapter, and mixed batches against requests run alone; then
the cache that builds each fusion's router once.

Everything runs on a small float32 Llama, so results agree to float32 rounding.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer, create_arrow_model
from peft.tuners.lora.config import ArrowConfig
from transformers import LlamaConfig, LlamaForCausalLM

from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.adapters.fusions import Fusion, FusionStore
from plait.server.adapters.routers import Gate, Router, RouterCache, arrow_router
from plait.server.engine.lora import LoRALayers
from plait.server.storage.objects import FolderObjects

MEMBERS = ["skill0", "skill1", "skill2"]
LENGTH = 6


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base and three same-shaped adapters (PEFT's Arrow wants equal ranks and targets)."""
    folder = tmp_path_factory.mktemp("fusion")
    torch.manual_seed(3)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    base = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft = get_peft_model(copy.deepcopy(base), lora, adapter_name=MEMBERS[0])
    for name in MEMBERS[1:]:
        peft.add_adapter(name, lora)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(folder, selected_adapters=MEMBERS)
    targets = base_lora_targets(base)
    adapters = [read_adapter(folder / name, targets, 16) for name in MEMBERS]
    return base, folder, targets, adapters


def _plait(base, targets, adapters):
    model = copy.deepcopy(base)
    layers = LoRALayers(
        model, targets, num_slots=len(adapters), max_rank=16, dtype=torch.float32, device=torch.device("cpu")
    )
    # Slots in reverse member order, so member order and slot order differ.
    for i, adapter in enumerate(adapters):
        layers.load(len(adapters) - 1 - i, adapter.modules)
    return model, layers


def _fused(n: int) -> list[tuple[int, float]]:
    return [(n - 1 - i, 1.0) for i in range(n)]


def test_arrow_weights_equal_a_direct_computation(made):
    _, _, _, adapters = made
    router = arrow_router(adapters, top_k=2, temperature=0.5)
    path = "model.layers.1.self_attn.q_proj"
    x = torch.randn(5, 64)
    # Prototypes straight from each full ΔW's SVD; scores |x·p|, top 2, softmax at T = 0.5.
    protos = torch.stack([torch.linalg.svd(a.modules[path].b @ a.modules[path].a).Vh[0] for a in adapters])
    scores = (x @ protos.t()).abs()
    top, idx = scores.topk(2, dim=1)
    want = torch.zeros(5, 3).scatter_(1, idx, torch.softmax(top / 0.5, dim=1))
    got = router.weights(path, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got > 0).sum(dim=1).eq(2).all()
    assert router.weights("model.layers.0.mlp.up_proj", x) is None  # no member adapts it


def test_arrow_in_the_layers_equals_peft_arrow(made, monkeypatch):
    base, folder, targets, adapters = made
    # PEFT finds each prototype by 15 power iterations, which here leaves some of them off by
    # up to 0.04 in cosine; run them to convergence, so both sides use the true prototypes.
    iterate = ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(
        ArrowLoraLinearLayer, "top_right_singular_vec_from_BA", lambda self, a, b: iterate(self, a, b, iters=2000)
    )
    peft = create_arrow_model(
        copy.deepcopy(base),
        [str(folder / name) for name in MEMBERS],
        ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0),
    )
    model, layers = _plait(base, targets, adapters)
    ids = torch.randint(0, 128, (1, LENGTH))
    layers.set_segments([LENGTH], [_fused(3)], [(arrow_router(adapters, top_k=2), [0])])
    with torch.inference_mode():
        got = model(ids).logits
        want = peft.eval()(ids).logits
        bare = base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - bare).abs().max() > 0.1


def test_one_member_fusion_equals_its_adapter(made):
    base, _, targets, adapters = made
    model, layers = _plait(base, targets, adapters[:1])
    ids = torch.randint(0, 128, (1, LENGTH))
    with torch.inference_mode():
        layers.set_segments([LENGTH], [0])
        alone = model(ids).logits
        (route,) = layers.set_segments([LENGTH], [[(0, 1.0)]], [(arrow_router(adapters[:1], top_k=1), [0])])
        fused = model(ids).logits
    torch.testing.assert_close(fused, alone, atol=1e-6, rtol=1e-6)
    assert torch.allclose(route.totals.sum(dim=1), torch.full((LENGTH,), 6.0))  # 2 layers x 3 modules, weight 1


def test_mixed_batch_answers_as_each_request_alone(made):
    """Two fusions with different routers, a plain adapter, a fixed-weight mix and the bare
    base in one batch; the plain adapter's slots coincide with a fusion's members."""
    base, _, targets, adapters = made
    model, layers = _plait(base, targets, adapters)
    arrow = arrow_router(adapters, top_k=2)
    gates = {p: Gate(torch.randn(3, g.rows.shape[1]), torch.randn(3), g.present) for p, g in arrow.gates.items()}
    learned = Router("learned", gates, top_k=1)
    fused = _fused(3)
    requests = [
        (fused, arrow),
        (2, None),
        (-1, None),
        (fused, learned),
        ([(0, 0.3), (2, -0.7)], None),
        (fused, None),  # the same slots as the fusions, fixed weights 1: must not be routed
        (fused, arrow),
    ]
    ids = torch.randint(0, 128, (len(requests), LENGTH))
    with torch.inference_mode():
        alone = []
        for i, (slots, router) in enumerate(requests):
            layers.set_segments([LENGTH], [slots], [(router, [0])] if router else [])
            alone.append(model(ids[i : i + 1]).logits[0])
        # One flat batch: attention is not what this test is about, so the tokens of all
        # requests go through the layers as one sequence per request, batched on dim 0.
        routes = {}
        for i, (_, router) in enumerate(requests):
            if router is not None:
                routes.setdefault(router, []).append(i)
        layers.set_segments([LENGTH] * len(requests), [s for s, _ in requests], list(routes.items()))
        together = model(ids).logits
    for i in range(len(requests)):
        torch.testing.assert_close(together[i], alone[i], atol=1e-5, rtol=1e-5)
    assert (alone[0] - alone[5]).abs().max() > 0.01  # routing changed the answer


# --- the router cache -------------------------------------------------------------------------


def _cache(made, reads: list | None = None) -> RouterCache:
    _, _, _, adapters = made
    by_name = dict(zip(MEMBERS, adapters, strict=True))

    def read_member(adapter_id: str, version: int):
        if reads is not None:
            reads.append((adapter_id, version))
        return by_name[adapter_id]

    return RouterCache(read_member, lambda fusion: b"", torch.device("cpu"))


def test_a_fusion_created_again_under_its_id_gets_its_new_router(made, tmp_path):
    """Even within the same second: the cache keys on the record's revision, not its time."""
    store, cache = FusionStore(FolderObjects(tmp_path)), _cache(made)
    versions = [(name, 1) for name in MEMBERS]
    first = cache.get(store.put(Fusion("mix", tuple(MEMBERS), "arrow", top_k=1)), versions)
    store.delete("mix")
    again = store.put(Fusion("mix", tuple(MEMBERS), "arrow", top_k=3, temperature=0.5))
    second = cache.get(again, versions)
    assert (first.top_k, second.top_k, second.temperature) == (1, 3, 0.5)
    assert cache.get(again, versions) is second


def test_routers_are_dropped_with_their_fusion_or_a_replaced_member(made, tmp_path):
    store, reads = FusionStore(FolderObjects(tmp_path)), []
    cache = _cache(made, reads)
    mix = store.put(Fusion("mix", tuple(MEMBERS), "arrow", top_k=1))
    pair = store.put(Fusion("pair", tuple(MEMBERS[:2]), "arrow", top_k=1))
    cache.get(mix, [(name, 1) for name in MEMBERS])
    cache.get(pair, [(name, 1) for name in MEMBERS[:2]])
    assert len(cache) == 2 and len(reads) == 5
    cache.forget_adapter(MEMBERS[2], keep_version=2)  # replaced: only "mix" used it
    assert len(cache) == 1
    cache.forget_fusion("pair")
    assert len(cache) == 0


def test_the_cache_takes_builds_and_forgets_from_many_threads_at_once(made, tmp_path):
    cache = _cache(made)
    fusion = FusionStore(FolderObjects(tmp_path)).put(Fusion("mix", tuple(MEMBERS), "arrow", top_k=1))
    errors, done = [], threading.Event()

    def build(worker: int) -> None:
        try:
            for version in range(worker * 1000, worker * 1000 + 40):  # a new key each time: an insert
                cache.get(fusion, [(name, version) for name in MEMBERS])
        except Exception as exc:
            errors.append(exc)

    def forget() -> None:
        while not done.wait(0.001):
            cache.forget_adapter(MEMBERS[0], keep_version=-1)

    forgetter = threading.Thread(target=forget)
    forgetter.start()
    builders = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    done.set()
    forgetter.join()
    assert errors == []
    cache.forget_adapter(MEMBERS[0])
    assert len(cache) == 0
