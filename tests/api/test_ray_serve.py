"""The Ray Serve application in deploy/ray/ on a local Ray instance: two replicas of the embedded
model on the CPU answer exactly as one `plait serve` does, and Ray's multiplexing sends each
adapter's requests to the replica that already holds it."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import httpx
import pytest

RAY_APP = Path(__file__).resolve().parents[2] / "deploy" / "ray"
ADAPTERS = ("alpha", "beta", "gamma", "delta")
# Each adapter twice in a row, twice over, then once more: round robin over two replicas would
# put every adapter on both.
SEQUENCE = [a for a in ADAPTERS for _ in range(2)] * 2 + list(ADAPTERS)
# Both sides compute alike: one thread, bf16, and no prefix cache (a cached prefix is read in a
# step of another size, which rounds differently in bf16: see the README's Reproducibility).
FLAGS = ["--threads", "1", "--dtype", "bfloat16", "--no-prefix-caching", "--max-gpu-adapters", "4"]


def _ask(base_url: str, model: str, n: int) -> httpx.Response:
    answer = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": f"Give me fact number {n} about the sea."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    return answer


def _round_robin_loads(sequence: list[str], replicas: int) -> int:
    held: list[set[str]] = [set() for _ in range(replicas)]
    loads = 0
    for i, adapter in enumerate(sequence):
        if adapter not in held[i % replicas]:
            held[i % replicas].add(adapter)
            loads += 1
    return loads


@pytest.fixture
def plait_ray(monkeypatch):
    """deploy/ray/plait_ray.py imported as Ray's replicas will import it (from their working dir)."""
    monkeypatch.setenv("PLAIT_RAY_ADAPTERS_PER_REPLICA", "2")
    spec = importlib.util.spec_from_file_location("plait_ray", RAY_APP / "plait_ray.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "plait_ray", module)
    spec.loader.exec_module(module)
    return module


def test_two_ray_replicas_answer_as_plait_serve_and_keep_each_adapter_in_one_place(
    launch_server, random_adapter, tmp_path, plait_ray
):
    import ray
    from ray import serve

    state = tmp_path / "state"
    shared = ["--store", f"file://{state / 'store'}", "--database", f"sqlite:///{state / 'records.sqlite3'}"]
    single = launch_server(*shared, *FLAGS)
    for n, adapter in enumerate(ADAPTERS):
        folder = random_adapter(tmp_path / adapter, seed=n)
        files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir())]
        assert httpx.post(f"{single.base_url}/v1/adapters", data={"id": adapter}, files=files).status_code == 201
    expected = {
        (adapter, n): _ask(single.base_url, adapter, n).json()["choices"][0]["message"]["content"]
        for n, adapter in enumerate(SEQUENCE)
    }
    single.process.terminate()  # one thing computing at a time
    single.process.wait(timeout=60)

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"working_dir": str(RAY_APP), "env_vars": {"PLAIT_RAY_ADAPTERS_PER_REPLICA": "2"}},
    )
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = plait_ray.app({"replicas": 2, "state_dir": str(state), "serve_flags": FLAGS})
        serve.run(application, name="plait", route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"

        served_by: dict[str, set[str]] = {adapter: set() for adapter in ADAPTERS}
        loads_seen: dict[str, int] = {}
        for n, adapter in enumerate(SEQUENCE):
            answer = _ask(base_url, adapter, n)
            assert answer.json()["choices"][0]["message"]["content"] == expected[adapter, n], (adapter, n)
            replica = answer.headers["x-plait-replica"]
            served_by[adapter].add(replica)
            loads_seen[replica] = max(loads_seen.get(replica, 0), int(answer.headers["x-plait-adapter-loads"]))

        assert len({r for replicas in served_by.values() for r in replicas}) == 2  # both replicas served
        # The replicas' own counts of adapters copied into a slot (each answer reports the count
        # before it; the last round follows every earlier request of its replica).
        loads = sum(loads_seen.values())
        assert loads < _round_robin_loads(SEQUENCE, 2) == 8
        assert sum(len(replicas) for replicas in served_by.values()) <= 6  # most adapters stayed on one replica

        # Whatever else the server answers comes through unchanged: a client error, in OpenAI's shape.
        refused = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "nope", "messages": []})
        assert refused.status_code in (400, 404) and "error" in refused.json()
        models = httpx.get(f"{base_url}/v1/models").json()["data"]
        assert {m["id"] for m in models} == {"SmolLM2-135M-Instruct", *ADAPTERS}
    finally:
        serve.shutdown()
        ray.shutdown()
