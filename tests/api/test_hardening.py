"""What a hostile client tried against a live server, and what must hold against it: one bad request
fails alone, nothing it sends stalls or leaks into other clients' requests, and the server never
answers a client's mistake with a 500. Then the same promises in-process, where the test can
reach inside (a failed engine, slow stores, a replaced adapter under queued requests)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from plait.server.serve import serve_http

ADMIN = {"Authorization": "Bearer admin-secret"}


def _files(folder: Path) -> list:
    return [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]


@pytest.fixture(scope="module")
def live(launch_module_server, tmp_path_factory, random_adapter):
    """One request runs at a time, so the others queue: what the replacement test needs."""
    server = launch_module_server("--admin-key", "admin-secret", "--max-running", "1")
    server.root = tmp_path_factory.mktemp("hardening")
    server.random_adapter = random_adapter
    with server.http(headers=ADMIN) as http:
        r = http.post("/v1/adapters", data={"id": "swap"}, files=_files(random_adapter(server.root / "v0", 0)))
        assert r.status_code == 201, r.text
    return server


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _chat(http, **extra):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **extra}
    return http.post("/v1/chat/completions", json=body)


def test_sampling_and_weights_that_overflow_fail_alone(live):
    with live.http() as http:
        tiny = _chat(http, temperature=1e-300)
        assert tiny.status_code == 200, tiny.text  # as good as greedy
        assert (
            tiny.json()["choices"][0]["message"]["content"]
            == _chat(http, temperature=0).json()["choices"][0]["message"]["content"]
        )
        for weight in (1e308, -1e308, 101.0):
            error = _error(_chat(http, adapters=[{"id": "swap", "weight": weight}]), 400)
            assert error["param"] == "adapters.0.weight"
        assert http.get("/health").status_code == 200
        assert _chat(http, model="swap").status_code == 200


def test_seeds_outside_int64_are_refused_and_leak_nothing(live):
    with live.http() as http:
        for seed in [2**63] * 150 + [-(2**63) - 1] * 150:  # more than --max-waiting (256)
            assert _error(_chat(http, seed=seed), 400)["param"] == "seed"
        assert _chat(http, seed=2**63 - 1).status_code == 200
        assert _chat(http, seed=-(2**63)).status_code == 200
        assert http.get("/health").json()["requests_in_flight"] == 0


def test_bodies_are_limited_by_what_is_read_and_big_prompts_never_stall_the_server(live):
    chunk = b'"' + b"x" * (1 << 20) + b'", '

    def chunked_body():  # 20 MiB with no Content-Length
        yield b'{"messages": [{"role": "user", "content": "hi"}], "padding": ['
        for _ in range(20):
            yield chunk
        yield b'"end"]}'

    with live.http() as http:
        started = time.monotonic()
        r = http.post("/v1/chat/completions", content=chunked_body(), headers={"Content-Type": "application/json"})
        assert _error(r, 413)["type"] == "invalid_request_error"
        assert time.monotonic() - started < 10

    # A 7 MiB prompt under the body limit: refused without tokenizing it; the server stays responsive.
    body = {"messages": [{"role": "user", "content": "word " * ((7 << 20) // 5)}], "max_tokens": 1}
    with ThreadPoolExecutor(1) as pool, live.http() as http:
        big = pool.submit(http.post, "/v1/chat/completions", json=body)
        health_started = time.monotonic()
        assert http.get("/health").status_code == 200
        assert time.monotonic() - health_started < 2
        error = _error(big.result(), 400)
        assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")


def test_a_completion_prompt_too_long_names_the_prompt(live):
    with live.http() as http:
        error = _error(http.post("/v1/completions", json={"prompt": [1] * 9000, "max_tokens": 1}), 400)
        assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
        error = _error(http.post("/v1/completions", json={"prompt": "hello " * 9000, "max_tokens": 1}), 400)
        assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")


def test_requests_queued_on_an_adapter_finish_while_it_is_replaced(live):
    """They resolved the adapter before it was replaced five times, and it was never read: the
    version they hold must still be there when their turn comes."""
    versions = [live.random_adapter(live.root / f"v{i}", i) for i in range(1, 6)]
    blocker = {"prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": True}
    body = {"model": "swap", "prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool, live.http() as http:
        running = pool.submit(http.post, "/v1/completions", json=blocker)  # takes the one running place
        _wait_for_metric(live, "plait_requests_running", 1)
        queued = [pool.submit(http.post, "/v1/completions", json=body) for _ in range(4)]
        _wait_for_metric(live, "plait_requests_waiting", 4)
        for folder in versions:
            r = http.post("/v1/adapters", data={"id": "swap"}, files=_files(folder), headers=ADMIN)
            assert r.status_code == 201, r.text
        assert not running.done(), "the blocker ended before the replacements; lengthen it"
        answers = [f.result() for f in queued]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers if a.status_code != 200]
    assert running.result().status_code == 200


def _wait_for_metric(server, name: str, value: float, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while server.metric(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_deeply_nested_json_is_a_400(live):
    nested = "[" * 100_000 + "]" * 100_000
    folder = live.random_adapter(live.root / "nested", 9)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "x": 0})[:-1] + f', "y": {nested}}}'
    )
    with live.http(headers=ADMIN) as http:
        error = _error(http.post("/v1/adapters", data={"id": "nested"}, files=_files(folder)), 400)
        assert error["param"] == "adapter_config.json" and "nested too deeply" in error["message"]
        body = '{"id": "f", "members": ["swap"], "router": "arrow", "extra": ' + nested + "}"
        r = http.post("/v1/fusions", content=body, headers={"Content-Type": "application/json"})
        assert _error(r, 400)["param"] == "fusion"
        r = http.post("/v1/fusions", data={"fusion": body}, files={"router_weights": ("r", b"x")})
        assert _error(r, 400)["param"] == "fusion"
        r = http.post("/v1/chat/completions", content=nested, headers={"Content-Type": "application/json"})
        _error(r, 400)


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def test_the_vllm_load_route_checks_sizes_before_reading(live):
    folder = live.root / "huge"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: costs no disk, but reading it would cost the memory
    before = _peak_rss(live.process.pid)
    with live.http(headers=ADMIN) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "huge", "lora_path": str(folder)})
    assert _error(r, 413)["message"].startswith("the adapter is 2147483")
    assert _peak_rss(live.process.pid) - before < 256 << 20


# --- in-process -------------------------------------------------------------------------------


async def _request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://plait") as client:
        return await client.request(method, path, **kwargs)


def test_listing_models_adapters_and_fusions_reads_files_off_the_event_loop(in_process):
    app, ctx = in_process()
    for store in (ctx.store, ctx.fusions):
        slow_list = store.list
        store.list = lambda slow_list=slow_list: time.sleep(1.0) or slow_list()

    async def go():
        lists = [
            asyncio.ensure_future(_request(app, "GET", path)) for path in ("/v1/models", "/v1/adapters", "/v1/fusions")
        ]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        health = await _request(app, "GET", "/health")
        health_seconds = time.monotonic() - started
        return health, health_seconds, await asyncio.gather(*lists)

    health, health_seconds, lists = asyncio.run(go())
    assert health.status_code == 200 and health_seconds < 0.5, health_seconds
    assert [r.status_code for r in lists] == [200, 200, 200]


def test_health_turns_503_when_the_engine_has_failed(in_process):
    app, ctx = in_process(run_engine=False)

    def broken_schedule():
        if ctx.engine.scheduler.waiting:
            raise RuntimeError("scheduler bug")
        return []

    ctx.engine.scheduler.schedule = broken_schedule
    runner = threading.Thread(target=lambda: pytest.raises(RuntimeError, ctx.engine.run))
    runner.start()
    deadline = time.monotonic() + 10
    while not ctx.engine.accepting:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    async def go():
        answer = await _request(app, "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        return answer, await _request(app, "GET", "/health")

    answer, health = asyncio.run(go())
    runner.join(10)
    assert _error(answer, 500)["code"] == "generation_failed"
    error = _error(health, 503)
    assert error["code"] == "failed" and "scheduler bug" in error["message"]


def test_the_server_process_exits_non_zero_when_the_engine_fails(in_process, capsys):
    app, ctx = in_process(run_engine=False)
    ctx.engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug"))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = serve_http(app, ctx.engine, Namespace(host="127.0.0.1", port=_free_port(), log_level="error"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert status == 1
    assert "the engine failed (RuntimeError: scheduler bug)" in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_deleted_fusion_lets_go_of_its_router(in_process, tmp_path):
    app, ctx = in_process()
    folder = tmp_path / "member"
    folder.mkdir()
    targets = list(ctx.lora_targets.items())[:2]
    tensors = {}
    for path, (n_in, n_out) in targets:
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(4, n_in)
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(n_out, 4)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))

    async def go():
        files = [
            ("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")
        ]
        assert (await _request(app, "POST", "/v1/adapters", data={"id": "m"}, files=files)).status_code == 201
        fusion = {"id": "f", "members": ["m"], "router": "arrow", "top_k": 1}
        assert (await _request(app, "POST", "/v1/fusions", json=fusion)).status_code == 201
        answer = await _request(app, "POST", "/v1/completions", json={"model": "f", "prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        cached = len(ctx.routers)
        assert (await _request(app, "DELETE", "/v1/fusions/f")).status_code == 200
        return cached

    assert asyncio.run(go()) == 1
    assert len(ctx.routers) == 0
    assert ctx.fusions.objects.list("fusions/") == []
