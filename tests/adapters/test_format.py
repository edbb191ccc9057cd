"""The PEFT adapter format: what `read_adapter` returns must be exactly what PEFT computes, and
every adapter it cannot serve faithfully must be refused with a message naming the culprit."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from plait.server.adapters.errors import AdapterFormatError
from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_lora_targets, read_adapter
from plait.server.adapters.patterns import check_pattern, pattern_key

MAX_RANK = 64
Q_PROJ_PATH = "model.layers.0.self_attn.q_proj"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_PROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def targets(base) -> dict[str, tuple[int, int]]:
    return base_lora_targets(base)


def save_peft_adapter(base: LlamaForCausalLM, folder: Path, **lora_kwargs) -> PeftModel:
    """Save a trained-looking PEFT adapter (non-zero A and B) and return the PeftModel that wrote it."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.1)
    peft_model.save_pretrained(folder)
    return peft_model


def peft_deltas(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT's own delta weight for every module it adapted, keyed by base module path."""
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for name, module in peft_model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }


def merged_logits(base: LlamaForCausalLM, adapter, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of `base` with each `scale * B @ A` added to its module's weight."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, weights in adapter.modules.items():
            modules[path].weight += weights.scale * weights.b.float() @ weights.a.float()
        return model(input_ids).logits


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        pytest.param(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), id="r4-qv"),
        pytest.param(
            dict(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
            id="r8-all-seven",
        ),
        pytest.param(dict(r=16, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj"]), id="rslora"),
        pytest.param(
            dict(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "up_proj"],
                rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 5},
            ),
            id="rank-and-alpha-patterns",
        ),
        pytest.param(
            dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["q_proj"], rank_pattern={"layers.0.*q_proj": 9}),
            id="rslora-with-rank-pattern",
        ),
        pytest.param(dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|gate_proj)"), id="regex-targets"),
    ],
)
def test_matches_peft(base, targets, tmp_path, lora_kwargs):
    peft_model = save_peft_adapter(base, tmp_path, **lora_kwargs)
    expected = peft_deltas(peft_model)

    adapter = read_adapter(tmp_path, targets, MAX_RANK)

    assert adapter.modules.keys() == expected.keys()
    for path, weights in adapter.modules.items():
        torch.testing.assert_close(weights.scale * weights.b @ weights.a, expected[path], msg=path)
    assert adapter.rank == max(w.a.shape[0] for w in adapter.modules.values())
    assert adapter.target_modules == tuple(sorted({p.rsplit(".", 1)[-1] for p in expected}))
    assert adapter.num_parameters == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    input_ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(merged_logits(base, adapter, input_ids), peft_model(input_ids).logits)


def test_rank_and_alpha_patterns_per_module(base, targets, tmp_path):
    save_peft_adapter(
        base,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
    )
    modules = read_adapter(tmp_path, targets, MAX_RANK).modules
    q0, v0, v1 = (modules[f"model.layers.{i}.self_attn.{m}"] for i, m in ((0, "q_proj"), (0, "v_proj"), (1, "v_proj")))
    assert (q0.rank, q0.scale) == (2, 8 / 2)
    assert (v0.rank, v0.scale) == (4, 8 / 4)
    assert (v1.rank, v1.scale) == (4, 3 / 4)


def test_fan_in_fan_out_is_ignored_like_peft_does_for_linear_layers(base, targets, tmp_path):
    save_peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    edit_config(tmp_path, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)

    adapter = read_adapter(tmp_path, targets, MAX_RANK)

    expected = peft_deltas(loaded)
    for path, weights in adapter.modules.items():
        torch.testing.assert_close(weights.scale * weights.b @ weights.a, expected[path])


def test_tensors_keep_their_stored_dtype(targets, good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path)
    edit_tensors(folder, lambda tensors: {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    adapter = read_adapter(folder, targets, MAX_RANK)
    assert {w.a.dtype for w in adapter.modules.values()} == {torch.bfloat16}
    assert {w.b.device.type for w in adapter.modules.values()} == {"cpu"}


def test_keys_with_the_adapter_name_are_accepted(targets, good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path)
    expected = read_adapter(folder, targets, MAX_RANK)
    edit_tensors(folder, lambda tensors: {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()})
    adapter = read_adapter(folder, targets, MAX_RANK)
    assert adapter.modules.keys() == expected.modules.keys()
    torch.testing.assert_close(adapter.modules[Q_PROJ_PATH].a, expected.modules[Q_PROJ_PATH].a)


def test_unknown_config_keys_are_ignored(targets, good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path)
    expected = read_adapter(folder, targets, MAX_RANK)
    edit_config(folder, some_future_field={"nested": [1, 2]}, lora_dropout=0.3, velora_config=None, task_type="X")
    adapter = read_adapter(folder, targets, MAX_RANK)
    assert adapter.modules.keys() == expected.modules.keys()
    assert adapter.base_model_name == expected.base_model_name


def test_base_lora_targets_are_the_linear_layers_without_lm_head(base, targets):
    assert len(targets) == 2 * 7
    assert targets["model.layers.1.self_attn.k_proj"] == (64, 32)  # 2 KV heads of 16
    assert targets["model.layers.0.mlp.down_proj"] == (128, 64)
    assert not any("lm_head" in path or "embed" in path for path in targets)


def test_base_lora_targets_on_a_4bit_model(base):
    """bitsandbytes' Linear4bit packs its weight; the unquantized sizes are what adapters need."""
    bnb = pytest.importorskip("bitsandbytes")
    model = copy.deepcopy(base)
    layer = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4")
    assert base_lora_targets(model)["model.layers.0.self_attn.q_proj"] == (layer.in_features, layer.out_features)


# Refusals. Each starts from one good PEFT adapter (r=4, alpha=8, q_proj and v_proj) and breaks one thing.


@pytest.fixture(scope="module")
def good_adapter(base, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good_adapter")
    save_peft_adapter(base, folder, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return folder


def copy_adapter(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "adapter"))


def edit_config(folder: Path, **changes) -> None:
    path = folder / ADAPTER_CONFIG
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_tensors(folder: Path, change) -> None:
    path = folder / ADAPTER_WEIGHTS
    safetensors.torch.save_file(change(safetensors.torch.load_file(path)), path)


def refused(folder: Path, targets, max_rank: int = MAX_RANK) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError) as info:
        read_adapter(folder, targets, max_rank)
    return info.value


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        (dict(use_dora=True), "use_dora", "'use_dora' is true; DoRA adapters are not supported"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save", "replace whole modules"),
        (dict(peft_type="IA3"), "peft_type", "only LORA"),
        (dict(bias="all"), "bias", "'bias' is \"all\""),
        (dict(bias="lora_only"), "bias", 'only "none"'),
        (dict(lora_bias=True), "lora_bias", "bias on lora_B"),
        (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication", "replicate layers"),
        (dict(trainable_token_indices=[3, 4]), "trainable_token_indices", "token embeddings"),
        (dict(alora_invocation_tokens=[5]), "alora_invocation_tokens", "aLoRA"),
        (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights", "path_initial_model_for_weight_conversion"),
        (dict(target_modules=["q_proj", "foo_proj"]), "target_modules", "unknown target module 'foo_proj'"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "target_modules", "embeddings and lm_head"),
        (dict(target_modules=r".*\.foo_proj"), "target_modules", "matches none of the base model's linear layers"),
        (dict(target_modules=7), "target_modules", "list of names or a regex"),
        (dict(r=8), "r", "'r' gives module 'model.layers.0.self_attn.q_proj' rank 8, but its tensors have rank 4"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern", "'rank_pattern' gives module"),
        (dict(r=0), "r", "positive integer"),
        (dict(lora_alpha="16"), "lora_alpha", "must be a number"),
        (dict(use_rslora="yes"), "use_rslora", "true or false"),
        (dict(alpha_pattern={"(q|v)*_proj": 3}), "alpha_pattern", "repeats a group that itself repeats or branches"),
        (dict(rank_pattern={"q_proj(": 2}), "rank_pattern", "not a valid regular expression"),
    ],
)
def test_config_refusals(targets, good_adapter, tmp_path, changes, field, words):
    folder = copy_adapter(good_adapter, tmp_path)
    edit_config(folder, **changes)
    error = refused(folder, targets)
    assert error.param == field
    assert words in error.message


def test_rank_above_the_server_maximum(targets, good_adapter):
    error = refused(good_adapter, targets, max_rank=2)
    assert error.param == "r"
    assert "rank 4, above this server's maximum LoRA rank of 2" in error.message


def wrong_a_shape(tensors):
    tensors[Q_PROJ_A] = torch.zeros(4, 65)
    return tensors


def wrong_b_rank(tensors):
    tensors[Q_PROJ_B] = torch.zeros(64, 3)
    return tensors


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (wrong_a_shape, Q_PROJ_A, "has shape [4, 65], but base module 'model.layers.0.self_attn.q_proj'"),
        (wrong_a_shape, Q_PROJ_A, "needs [4, 64]"),
        (wrong_b_rank, Q_PROJ_B, "has shape [64, 3]"),
        (lambda t: t | {Q_PROJ_A: torch.zeros(4, 64, 1)}, Q_PROJ_A, "not 2-D"),
        (lambda t: {k: v for k, v in t.items() if k != Q_PROJ_B}, Q_PROJ_A, "has no matching lora_B"),
        (lambda t: {k: v for k, v in t.items() if k != Q_PROJ_A}, Q_PROJ_B, "has no matching lora_A"),
        (lambda t: t | {Q_PROJ_A: torch.zeros(4, 64, dtype=torch.int32)}, Q_PROJ_A, "not floating point"),
        (lambda t: t | {Q_PROJ_A: torch.full((4, 64), float("nan"))}, Q_PROJ_A, "NaN or infinite"),
        (
            lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()},
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
            "layer 7 does not exist: the base model has 2 layers",
        ),
        (
            lambda t: t | {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
            "base_model.model.lm_head.lora_A.weight",
            "LoRA on embeddings and lm_head is not supported",
        ),
        (
            lambda t: t | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)},
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "LoRA on embeddings",
        ),
        (
            lambda t: t | {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "DoRA",
        ),
        (
            lambda t: t | {"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.zeros(4, 64)},
            "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight",
            "no linear layer 'model.layers.0.self_attn.rotary'",
        ),
        (
            lambda t: t | {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)},
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "unexpected tensor",
        ),
        (
            lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()},
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "does not start with 'base_model.model.'",
        ),
        (
            lambda t: t | {Q_PROJ_A.replace(".weight", ".default.weight"): t[Q_PROJ_A].clone()},
            Q_PROJ_A,
            "are the same weight",
        ),
        (lambda t: {}, ADAPTER_WEIGHTS, "holds no tensors"),
    ],
)
def test_tensor_refusals(targets, good_adapter, tmp_path, change, field, words):
    folder = copy_adapter(good_adapter, tmp_path)
    edit_tensors(folder, change)
    error = refused(folder, targets)
    assert error.param == field
    assert words in error.message


class _RunsOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_never_loaded(targets, good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path)
    marker = tmp_path / "unpickled"
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_RunsOnUnpickle(marker)))
    error = refused(folder, targets)
    assert "only adapter_model.safetensors is accepted" in error.message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "field", "words"),
    [
        (lambda f: (f / ADAPTER_CONFIG).unlink(), ADAPTER_CONFIG, "adapter_config.json is missing"),
        (lambda f: (f / ADAPTER_WEIGHTS).unlink(), ADAPTER_WEIGHTS, "adapter_model.safetensors is missing"),
        (lambda f: (f / ADAPTER_CONFIG).write_text('{"r": 4,'), ADAPTER_CONFIG, "not valid JSON"),
        (lambda f: (f / ADAPTER_CONFIG).write_text("[1, 2]"), ADAPTER_CONFIG, "not a JSON object"),
        (lambda f: (f / ADAPTER_CONFIG).write_bytes(b"\xff\xfe{"), ADAPTER_CONFIG, "cannot be read"),
        (lambda f: truncate(f / ADAPTER_WEIGHTS), ADAPTER_WEIGHTS, "not a valid safetensors file"),
        (lambda f: (f / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 7), ADAPTER_WEIGHTS, "not a valid safetensors file"),
    ],
)
def test_file_refusals(targets, good_adapter, tmp_path, damage, field, words):
    folder = copy_adapter(good_adapter, tmp_path)
    damage(folder)
    error = refused(folder, targets)
    assert error.param == field
    assert words in error.message


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


# PEFT's pattern rules, and the guard against patterns that backtrack for long.


@pytest.mark.parametrize(
    ("keys", "path", "expected"),
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
        (["proj"], "model.layers.0.self_attn.q_proj", None),  # a suffix must start after a dot
        (["layers.1.self_attn.q_proj", "q_proj"], "model.layers.1.self_attn.q_proj", "layers.1.self_attn.q_proj"),
        (["layers.1.self_attn.q_proj", "q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
        (["^model.layers.0.mlp.up_proj"], "model.layers.0.mlp.up_proj", "^model.layers.0.mlp.up_proj"),
        (["layers.[01].self_attn.v_proj"], "model.layers.1.self_attn.v_proj", "layers.[01].self_attn.v_proj"),
    ],
)
def test_pattern_key_follows_peft(keys, path, expected):
    from peft.utils.other import get_pattern_key

    assert pattern_key(keys, path) == expected
    assert get_pattern_key(keys, path) == (expected if expected is not None else path)


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q_proj|v_proj)",
        "q_proj",
        r"model\.layers\.\d+\.self_attn\.[qkv]_proj",
        r"(?:.*\.)?(q|v)_proj$",
        "[]|*+]x",
    ],
)
def test_ordinary_patterns_pass_the_guard(pattern):
    check_pattern(pattern, "target_modules")


@pytest.mark.parametrize(
    "pattern", ["(a+)+b", "(a|a)*b", "(a?){30}a{30}", r"((\w)*)+x", "(?:a*)*b", ".*.*.*.*.*.*x", "x" * 300]
)
def test_backtracking_patterns_are_refused_at_once(pattern):
    start = time.perf_counter()
    with pytest.raises(AdapterFormatError):
        check_pattern(pattern, "rank_pattern")
    assert time.perf_counter() - start < 0.1
