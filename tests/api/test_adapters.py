"""Many adapters through the HTTP API: upload, serve side by side, replace, refuse bad ones.

Adapters are made by PEFT on the same NF4 base the server runs; each answer is scored by
`PeftModel` on the exact tokens the server chose (tolerances as in test_lora_engine.py,
where they are explained).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from plait.server.base_model import load_nf4_model, load_tokenizer, prepare_cpu_weights, resolve_model

# Logprobs of the chosen tokens, server against PEFT on the same NF4 weights, which both keep
# dequantized as the server does on the CPU (server/base_model.py); see test_lora_engine.py for
# the kernels' own noise.
LOGPROB_MAX_ATOL = 0.3
LOGPROB_MEAN_ATOL = 0.1
ADMIN = {"Authorization": "Bearer admin-secret"}
ADAPTERS = {
    "rank4-attn": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rank16-all": dict(r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "rank8-mlp": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "down_proj"]),
    "rank8-mlp-v2": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "down_proj"]),
    # For TIES, whose PEFT reference merges every module on the CPU: few layers, so it takes seconds.
    "ties-a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 2, 3, 4, 5]),
    "ties-b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 1, 2, 3, 4, 5]),
}
PROMPTS = ["The capital of France is", "My favourite colour is", "Water boils at"]
NEW_TOKENS = 6
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def peft(tmp_path_factory):
    """All adapters in one PeftModel on the NF4 base, and the folder they were saved to."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    names = list(ADAPTERS)
    model = get_peft_model(_dequantized_base(), _config(names[0]), names[0])
    for name in names[1:]:
        model.add_adapter(name, _config(name))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # PEFT starts B at zero: make every delta count
            torch.nn.init.normal_(p, std=0.04)
    model.save_pretrained(root, selected_adapters=names)
    return model.eval(), root


def _config(name: str) -> LoraConfig:
    return LoraConfig(**ADAPTERS[name], lora_dropout=0.0, task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def server(launch_module_server, peft):
    """Two device slots and two CPU entries for the adapters: eviction all the time."""
    s = launch_module_server(
        "--admin-key",
        "admin-secret",
        "--max-gpu-adapters",
        "2",
        "--max-cpu-adapters",
        "2",
        "--max-lora-rank",
        "32",
        "--max-adapter-mb",
        "24",
    )
    _, root = peft
    with s.http() as http:
        for name in ("rank4-attn", "rank16-all", "rank8-mlp"):
            r = _upload(http, name, _files(root / name))
            assert r.status_code == 201, r.text
    return s


def _files(folder: Path) -> list:
    return [("files", (name, (folder / name).read_bytes())) for name in FILES]


def _upload(http, adapter_id, files, headers=ADMIN):
    return http.post("/v1/adapters", data={"id": adapter_id}, files=files, headers=headers)


def _ask(server, model=None, prompt=PROMPTS[0], **extra):
    body = {
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "logprobs": 0,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
        **extra,
    }
    if model:
        body["model"] = model
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return [int(t.removeprefix("token_id:")) for t in lp["tokens"]], torch.tensor(lp["token_logprobs"])


@pytest.fixture(scope="module")
def assert_matches(peft, tokenizer, peft_logprobs):
    def check(prompt, adapter, answer) -> float:
        """The answer's logprobs agree with PEFT; returns how far the adapter moved them from the base."""
        new_ids, got = answer
        prompt_ids = tokenizer.encode(prompt)
        expected = peft_logprobs(peft[0], adapter, prompt_ids, new_ids)
        diff = (got - expected).abs()
        assert diff.max() < LOGPROB_MAX_ATOL and diff.mean() < LOGPROB_MEAN_ATOL, (prompt, adapter, got, expected)
        return float((got - peft_logprobs(peft[0], None, prompt_ids, new_ids)).abs().max())

    return check


def test_models_lists_every_adapter_under_the_base(server):
    with server.http() as http:
        data = http.get("/v1/models").json()["data"]
    assert data[0]["id"] == server.model and data[0]["parent"] is None
    assert {m["id"]: m["parent"] for m in data[1:]} == dict.fromkeys(
        ("rank4-attn", "rank16-all", "rank8-mlp"), server.model
    )


def test_concurrent_requests_over_all_adapters_match_peft(server, assert_matches):
    jobs = [(p, a) for a in (None, "rank4-attn", "rank16-all", "rank8-mlp") for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _ask(server, job[1], job[0]), jobs))
    effect: dict[str, float] = {}
    for (prompt, adapter), answer in zip(jobs, answers, strict=True):
        moved = assert_matches(prompt, adapter, answer)
        if adapter:
            effect[adapter] = max(effect.get(adapter, 0.0), moved)
    # Each adapter moves the answer further than the tolerance: serving the wrong weights
    # (or none) could not pass the checks above.
    assert all(e > LOGPROB_MAX_ATOL for e in effect.values()), effect
    assert (
        server.metric("plait_adapter_evictions_total", 'adapter="rank4-attn"')
        + server.metric("plait_adapter_evictions_total", 'adapter="rank16-all"')
        + server.metric("plait_adapter_evictions_total", 'adapter="rank8-mlp"')
        > 0
    )


def test_weighted_adapters_match_peft_cat_combination(server, peft, assert_matches):
    model, _ = peft
    model.add_weighted_adapter(["rank4-attn", "rank8-mlp"], [0.5, 1.5], "mix", combination_type="cat")
    answer = _ask(server, adapters=[{"id": "rank4-attn", "weight": 0.5}, {"id": "rank8-mlp", "weight": 1.5}])
    assert_matches(PROMPTS[0], "mix", answer)
    model.delete_adapter("mix")


def test_ties_combination_matches_peft_ties_svd(server, peft, assert_matches):
    """TIES on the full deltas of adapters of different ranks and targets, cut back by SVD."""
    model, root = peft
    members, weights = ["ties-a", "ties-b"], [4.0, 3.0]
    with server.http() as http:
        for name in members:
            assert _upload(http, name, _files(root / name)).status_code == 201
    model.add_weighted_adapter(members, weights, "ties", combination_type="ties_svd", density=0.5)
    combination = {"method": "ties", "density": 0.5}
    answer = _ask(
        server,
        prompt=PROMPTS[1],
        combination=combination,
        adapters=[{"id": a, "weight": w} for a, w in zip(members, weights, strict=True)],
    )
    assert assert_matches(PROMPTS[1], "ties", answer) > LOGPROB_MAX_ATOL
    # The merged adapter takes a slot of its own, named after its members in the metrics.
    assert server.metric("plait_adapter_loads_total", 'adapter="ties(ties-a,ties-b)"') >= 1
    model.delete_adapter("ties")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"combination": {"method": "ties"}}, "combination"),  # nothing to combine
        ({"adapters": [{"id": "rank4-attn"}], "combination": {"method": "ties", "rank": 64}}, "combination.rank"),
        ({"adapters": [{"id": "rank4-attn"}], "combination": {"method": "dare_ties", "density": 0}}, "combination"),
        ({"adapters": [{"id": "rank4-attn"}], "combination": {"method": "average"}}, "combination"),
    ],
)
def test_bad_combinations_are_refused(server, extra, param):
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_replacement_under_load_is_atomic(server, peft, assert_matches):
    _, root = peft
    before = _ask(server, "rank8-mlp", PROMPTS[1])
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_ask, server, "rank8-mlp", PROMPTS[1], max_tokens=24) for _ in range(2)]
        with server.http() as http:
            r = _upload(http, "rank8-mlp", _files(root / "rank8-mlp-v2"))
        assert r.status_code == 201 and r.json()["version"] > 1
        for f in running:
            f.result()  # in-flight requests finish without error
    after = _ask(server, "rank8-mlp", PROMPTS[1])
    assert_matches(PROMPTS[1], "rank8-mlp", before)
    assert_matches(PROMPTS[1], "rank8-mlp-v2", after)
    # Put the first version back for the other tests.
    with server.http() as http:
        assert _upload(http, "rank8-mlp", _files(root / "rank8-mlp")).status_code == 201


def test_archive_upload_get_and_delete(server, peft):
    _, root = peft
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in FILES:
            z.write(root / "rank4-attn" / name, f"my-adapter/{name}")
    with server.http() as http:
        r = _upload(http, "zipped", [("files", ("adapter.zip", buf.getvalue()))])
        assert r.status_code == 201, r.text
        info = http.get("/v1/adapters/zipped").json()
        assert info["rank"] == 4 and info["target_modules"] == ["q_proj", "v_proj"]
        r = http.post("/v1/completions", json={"model": "zipped", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and server.metric("plait_adapter_loads_total", 'adapter="zipped"') == 1
        assert http.delete("/v1/adapters/zipped", headers=ADMIN).json()["deleted"] is True
        assert http.get("/v1/adapters/zipped").status_code == 404
        # The engine lets go of its slot at once instead of leaving it to age out.
        deadline = time.monotonic() + 10
        while server.metric("plait_adapter_evictions_total", 'adapter="zipped"') < 1:
            assert time.monotonic() < deadline, "a deleted adapter kept its device slot"
            time.sleep(0.05)
        r = http.post("/v1/completions", json={"model": "zipped", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _bad_uploads(root: Path, tmp: Path) -> dict[str, tuple[list, int, str]]:
    good = dict((name, (root / "rank4-attn" / name).read_bytes()) for name in FILES)
    config = json.loads(good[FILES[0]])
    tiny = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp / "tiny")
    big_rank = {
        k: torch.zeros(48, 576) if "lora_A" in k else torch.zeros(576, 48)
        for k in (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        )
    }
    save_file(big_rank, tmp / "big.safetensors")

    def files(cfg=good[FILES[0]], weights=good[FILES[1]], weights_name=FILES[1]):
        return [("files", (FILES[0], cfg)), ("files", (weights_name, weights))]

    return {
        "not-safetensors": (files(weights=b"definitely not safetensors"), 400, "safetensors"),
        "pickle": (files(weights=b"\x80\x04pickle", weights_name="adapter_model.bin"), 400, "adapter_model.bin"),
        "truncated": (files(weights=good[FILES[1]][: len(good[FILES[1]]) // 2]), 400, "safetensors"),
        "wrong-shapes": (_files(tmp / "tiny"), 400, "shape"),
        "unknown-target": (
            files(cfg=json.dumps({**config, "target_modules": ["q_proj", "foo_proj"]}).encode()),
            400,
            "foo_proj",
        ),
        "rank-too-big": (
            files(cfg=json.dumps({**config, "r": 48}).encode(), weights=(tmp / "big.safetensors").read_bytes()),
            400,
            "rank",
        ),
        "dora": (files(cfg=json.dumps({**config, "use_dora": True}).encode()), 400, "use_dora"),
        "oversized": (files(weights=b"\0" * (30 << 20)), 413, "bytes"),
        "../escape": (files(), 400, "id"),
        "a/b": (files(), 400, "id"),
    }


def test_bad_uploads_are_refused_and_leave_nothing(server, peft, tmp_path):
    _, root = peft
    data_dir = next(Path(server.log_path.parent).glob("data-*")) / "adapters"
    entries_before = sorted(p.name for p in data_dir.iterdir())
    with server.http() as http:
        listed_before = http.get("/v1/adapters").json()["data"]
        for adapter_id, (files, status, words) in _bad_uploads(root, tmp_path).items():
            r = _upload(http, adapter_id, files)
            assert r.status_code == status, (adapter_id, r.text)
            error = r.json()["error"]
            assert words in error["message"] + str(error["param"]), (adapter_id, error)
        assert http.get("/v1/adapters").json()["data"] == listed_before
    assert sorted(p.name for p in data_dir.iterdir()) == entries_before


def test_vllm_load_and_unload_routes(server, peft):
    _, root = peft
    with server.http() as http:
        r = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "via-vllm", "lora_path": "/no/such/folder"}, headers=ADMIN
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "lora_path"
        r = http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "via-vllm", "lora_path": str(root / "rank4-attn")},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        assert "via-vllm" in [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "via-vllm"}, headers=ADMIN).status_code == 200
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "via-vllm"}, headers=ADMIN)
        assert r.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/v1/adapters", {"data": {"id": "x"}, "files": [("files", ("a.zip", b"x"))]}),
        ("DELETE", "/v1/adapters/rank4-attn", {}),
        ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": "/tmp"}}),
        ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "rank4-attn"}}),
    ],
)
def test_mutating_routes_need_the_admin_key(server, method, path, kwargs):
    with server.http() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/adapters/rank4-attn").status_code == 200  # still there


def test_restart_keeps_the_store(server, launch_server):
    data_dir = next(Path(server.log_path.parent).glob("data-*"))
    again = launch_server("--data-dir", str(data_dir))
    with again.http() as http:
        ids = {a["id"] for a in http.get("/v1/adapters").json()["data"]}
    assert {"rank4-attn", "rank16-all", "rank8-mlp"} <= ids
    tokens, _ = _ask(again, "rank4-attn")
    assert len(tokens) == NEW_TOKENS


def _dequantized_base():
    """The served NF4 base as the server keeps it on the CPU: dequantized, exactly the NF4 values."""
    model = load_nf4_model(resolve_model(None), torch.device("cpu"))
    prepare_cpu_weights(model, "dequantized")
    return model
