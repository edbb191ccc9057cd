"""Fusions through the HTTP API: create, serve, report member weights, refuse bad ones, persist.

Member adapters are written directly in PEFT's format for the embedded model's shapes
(random, non-zero), so no PEFT model has to be built here; what routing computes is
checked against PEFT and a direct computation in test_fusion_routing.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

ADMIN = {"Authorization": "Bearer admin-secret"}
HIDDEN, LAYERS = 576, 30  # the embedded model's
MEMBERS = ["skill-a", "skill-b", "skill-c"]
NEW_TOKENS = 5
PROMPT = "The capital of France is"


def _upload(http, adapter_id: str, folder: Path):
    files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    return http.post("/v1/adapters", data={"id": adapter_id}, files=files, headers=ADMIN)


@pytest.fixture(scope="module")
def server(launch_module_server, tmp_path_factory, random_adapter):
    root = tmp_path_factory.mktemp("members")
    s = launch_module_server("--admin-key", "admin-secret")
    with s.http() as http:
        for i, name in enumerate(MEMBERS):
            random_adapter(root / name, seed=i, base="SmolLM2-135M-Instruct")
            assert _upload(http, name, root / name).status_code == 201
        random_adapter(root / "other-base", seed=9, base="SomeOtherModel-1B")
        assert _upload(http, "other-base", root / "other-base").status_code == 201
    s.members_root = root
    return s


def _create(http, body, headers=ADMIN):
    return http.post("/v1/fusions", json=body, headers=headers)


def _ask(server, model, stream=False, **extra):
    """One greedy answer. Tests that compare two answers ask once before: a prompt whose leading
    blocks are cached computes its rest in a smaller step, which in bf16 rounds differently."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "logprobs": True,
        "ignore_eos": True,
        **extra,
    }
    if not stream:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=300
    ) as r:
        lines = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return lines


def _logprobs(answer) -> torch.Tensor:
    return torch.tensor([t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]])


def test_arrow_fusion_is_a_model_and_reports_member_weights(server):
    with server.http() as http:
        r = _create(http, {"id": "arrow-mix", "members": MEMBERS, "router": "arrow", "top_k": 2})
        assert r.status_code == 201, r.text
        assert r.json()["members"] == MEMBERS and r.json()["top_k"] == 2
        assert http.get("/v1/fusions/arrow-mix").json()["router"] == "arrow"
        assert "arrow-mix" in [f["id"] for f in http.get("/v1/fusions").json()["data"]]
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert models["arrow-mix"]["parent"] == server.model
    _ask(server, "arrow-mix")
    answer = _ask(server, "arrow-mix")
    assert answer["model"] == "arrow-mix"
    report = answer["fusion"]
    assert report["router"] == "arrow" and [m["id"] for m in report["members"]] == MEMBERS
    weights = torch.tensor([m["weight"] for m in report["members"]])
    assert abs(weights.sum() - 1) < 1e-4 and (weights >= 0).all()
    assert (weights > 0).sum() >= 2  # top-2 per token: at least two members got weight somewhere
    # The stream ends with the same report on the chunk that finishes.
    chunks = _ask(server, "arrow-mix", stream=True)
    final = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert final and final[0]["fusion"]["members"] == report["members"]


def test_weights_fusion_equals_the_same_weighted_request(server):
    with server.http() as http:
        r = _create(http, {"id": "fixed-mix", "members": MEMBERS[:2], "router": "weights", "weights": [0.8, -0.5]})
        assert r.status_code == 201, r.text
    weighted = [{"id": MEMBERS[0], "weight": 0.8}, {"id": MEMBERS[1], "weight": -0.5}]
    _ask(server, "fixed-mix"), _ask(server, None, adapters=weighted)
    fused = _ask(server, "fixed-mix")
    direct = _ask(server, None, adapters=weighted)
    assert fused["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    torch.testing.assert_close(_logprobs(fused), _logprobs(direct))
    assert [m["weight"] for m in fused["fusion"]["members"]] == [0.8, -0.5]


def test_one_member_fusion_equals_its_adapter(server):
    with server.http() as http:
        assert _create(http, {"id": "solo", "members": [MEMBERS[2]], "router": "arrow"}).status_code == 201
    fused, alone, base = _ask(server, "solo"), _ask(server, MEMBERS[2]), _ask(server, server.model)
    torch.testing.assert_close(_logprobs(fused), _logprobs(alone))
    assert fused["fusion"]["members"] == [{"id": MEMBERS[2], "weight": 1.0}]
    assert (_logprobs(alone) - _logprobs(base)).abs().max() > 1e-3  # the adapter does something


def test_learned_router_uploads_with_its_gates(server):
    gates = {}
    for layer in range(LAYERS):
        for module in ("q_proj", "v_proj"):
            path = f"model.layers.{layer}.self_attn.{module}"
            gates[f"{path}.weight"] = torch.zeros(2, HIDDEN)
            gates[f"{path}.bias"] = torch.tensor([1.0, -1.0])  # with top_k 1: always the first member
    fusion = {"id": "learned-mix", "members": MEMBERS[:2], "router": "learned", "top_k": 1}
    with server.http() as http:
        r = http.post(
            "/v1/fusions",
            data={"fusion": json.dumps(fusion)},
            headers=ADMIN,
            files={"router_weights": ("router.safetensors", save(gates))},
        )
        assert r.status_code == 201, r.text
        wrong = {k: (v[:, :10].contiguous() if v.ndim == 2 else v) for k, v in gates.items()}
        r = http.post(
            "/v1/fusions",
            data={"fusion": json.dumps({**fusion, "id": "learned-bad"})},
            headers=ADMIN,
            files={"router_weights": ("router.safetensors", save(wrong))},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "router_weights", r.text
    fused = _ask(server, "learned-mix")
    assert fused["fusion"]["members"] == [{"id": MEMBERS[0], "weight": 1.0}, {"id": MEMBERS[1], "weight": 0.0}]
    torch.testing.assert_close(_logprobs(fused), _logprobs(_ask(server, MEMBERS[0])))


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"id": "f1", "members": ["skill-a", "nope"], "router": "arrow"}, 400, "members.1"),
        ({"id": "f2", "members": MEMBERS, "router": "arrow", "top_k": 4}, 400, "top_k"),
        ({"id": "f3", "members": MEMBERS, "router": "arrow", "top_k": 0}, 400, "top_k"),
        ({"id": "f4", "members": MEMBERS[:2], "router": "weights", "weights": [1.0]}, 400, "weights"),
        ({"id": "f5", "members": MEMBERS[:2], "router": "weights"}, 400, "weights"),
        ({"id": "f6", "members": MEMBERS[:2], "router": "learned"}, 400, "router_weights"),
        ({"id": "f7", "members": MEMBERS[:2], "router": "magic"}, 400, "router"),
        ({"id": "f8", "members": ["skill-a", "skill-a"], "router": "arrow"}, 400, "members"),
        ({"id": "f9", "members": ["skill-a", "other-base"], "router": "arrow"}, 400, "members"),
        ({"id": "../up", "members": MEMBERS, "router": "arrow"}, 400, "id"),
        ({"id": "skill-a", "members": MEMBERS, "router": "arrow"}, 409, "id"),
        ({"id": "f10", "members": [], "router": "arrow"}, 400, "members"),
        ({"id": "f11", "members": MEMBERS, "router": "arrow", "temperature": 1e-300}, 400, "temperature"),
        ({"id": "f12", "members": MEMBERS[:2], "router": "weights", "weights": [1e308, 1.0]}, 400, "weights"),
    ],
)
def test_bad_fusions_are_refused(server, body, status, param):
    with server.http() as http:
        r = _create(http, body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param, r.json()
        assert http.get(f"/v1/fusions/{body['id']}").status_code == 404 or body["id"] == "skill-a"
    assert not [p for p in (server.log_path.parent.glob("data-*/fusions/.*"))]  # nothing half-written


def test_admin_key_and_conflicts(server):
    with server.http() as http:
        assert _create(http, {"id": "nokey", "members": MEMBERS, "router": "arrow"}, headers={}).status_code == 401
        assert http.delete("/v1/fusions/arrow-mix").status_code == 401
        assert _create(http, {"id": "dup", "members": MEMBERS, "router": "arrow"}).status_code == 201
        assert _create(http, {"id": "dup", "members": MEMBERS, "router": "arrow"}).status_code == 409
        # A member of a fusion cannot be deleted, nor can an adapter take a fusion's name.
        r = http.delete(f"/v1/adapters/{MEMBERS[2]}", headers=ADMIN)
        assert r.status_code == 409 and "dup" in r.json()["error"]["message"]
        r = _upload(http, "dup", server.members_root / MEMBERS[0])
        assert r.status_code == 400 and "fusion" in r.json()["error"]["message"]
        assert http.delete("/v1/fusions/dup", headers=ADMIN).status_code == 200
        assert http.get("/v1/fusions/dup").status_code == 404
        assert http.delete("/v1/fusions/dup", headers=ADMIN).status_code == 404


def test_fusions_survive_a_restart(server, launch_server):
    with server.http() as http:
        r = _create(http, {"id": "kept", "members": MEMBERS, "router": "arrow", "top_k": 1, "temperature": 0.5})
        assert r.status_code == 201
        before = _ask(server, "kept")
    data_dir = next(Path(server.log_path.parent).glob("data-*"))
    again = launch_server("--data-dir", str(data_dir))
    with again.http() as http:
        kept = http.get("/v1/fusions/kept").json()
    assert kept["members"] == MEMBERS and kept["top_k"] == 1 and kept["temperature"] == 0.5
    after = _ask(again, "kept")
    assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]


def _skill_data(path: Path, prompt: str, n: int = 6) -> Path:
    words = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "ocean", "garden"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{prompt} {words[i]} {words[-1 - i]}", "completion": words[i]}) + "\n")
    return path


def test_train_router_publishes_a_fusion_that_routes_by_skill(server, tmp_path):
    """`plait train-router --publish` end to end: the learned fusion sends each skill's prompts
    mostly to that skill's adapter."""
    data = {
        "skill-a": _skill_data(tmp_path / "a.jsonl", "Reverse the words:"),
        "skill-b": _skill_data(tmp_path / "b.jsonl", "SHOUT THIS NOW:"),
    }
    cmd = [
        sys.executable,
        "-m",
        "plait.cli",
        "train-router",
        "--output",
        str(tmp_path / "router"),
        "--dtype",
        "float32",
        "--epochs",
        "3",
        "--max-examples",
        "6",
        "--fusion-id",
        "routed",
        "--publish",
        server.base_url,
        "--admin-key",
        "admin-secret",
    ]
    for name, path in data.items():
        cmd += ["--adapter", f"{name}={server.members_root / name}", "--data", f"{name}={path}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"router.safetensors", "fusion.json", "report.json"} <= {p.name for p in (tmp_path / "router").iterdir()}
    with server.http() as http:
        fusion = http.get("/v1/fusions/routed").json()
    assert fusion["router"] == "learned" and fusion["members"] == list(data)
    # share[s][m]: member m's mean routing weight over three of skill s's prompts. A router
    # trained on six examples is weak (and top-1 flips near-ties between layers), so the
    # check is relative: each skill's prompts give its own adapter clearly more weight than
    # the other skill's prompts give it.
    share = []
    for path in data.values():
        weights = []
        for line in path.read_text().splitlines()[:3]:
            body = {
                "model": "routed",
                "messages": [{"role": "user", "content": json.loads(line)["prompt"]}],
                "max_tokens": 3,
            }
            fusion = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300).json()["fusion"]
            weights.append([m["weight"] for m in fusion["members"]])
        share.append(torch.tensor(weights).mean(0))
    assert share[0][0] > share[1][0] + 0.1 and share[1][1] > share[0][1] + 0.1, share


def test_train_router_refuses_bad_arguments_before_loading_anything(tmp_path):
    base = [sys.executable, "-m", "plait.cli", "train-router", "--output", str(tmp_path / "r")]
    data = _skill_data(tmp_path / "a.jsonl", "Hi")
    for extra, message in [
        (["--adapter", "a=x", "--data", "b=" + str(data)], "same members"),
        (["--adapter", "a", "--data", "a=" + str(data)], "ID=PATH"),
        (["--adapter", f"a={tmp_path}", "--data", f"a={data}", "--top-k", "2"], "--top-k"),
        (["--adapter", f"a={tmp_path}", "--data", f"a={data}"], "no adapter_config.json"),
    ]:
        done = subprocess.run(base + extra, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)


def test_an_adapter_trained_on_another_base_is_served_with_a_warning(server, random_adapter, tmp_path):
    random_adapter(tmp_path / "quantized-copy", seed=4, base="unsloth/SmolLM2-135M-Instruct-bnb-4bit")
    with server.http() as http:
        assert _upload(http, "from-unsloth", tmp_path / "quantized-copy").status_code == 201
        records = {a["id"]: a for a in http.get("/v1/adapters").json()["data"]}
        other = http.get("/v1/adapters/other-base").json()
    # The same model under a pre-quantized copy's name: no warning.
    assert records["from-unsloth"]["warnings"] == [] and records["skill-a"]["warnings"] == []
    assert records["from-unsloth"]["base_model_name_or_path"] == "unsloth/SmolLM2-135M-Instruct-bnb-4bit"
    assert other["base_model_name_or_path"] == "SomeOtherModel-1B"
    assert len(other["warnings"]) == 1 and "trained on 'SomeOtherModel-1B'" in other["warnings"][0]
    assert records["other-base"]["warnings"] == other["warnings"]
    assert _ask(server, "other-base")["choices"][0]["message"]["content"]  # served all the same
