"""What a gateway in front of a fleet reads and relies on: the Inference Extension's metrics
(vLLM's names) checked against what the server is doing, the model cards' fields, and a drain on
SIGTERM that finishes the requests in flight while refusing new ones with 503."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx

MAX_GPU_ADAPTERS = 3


def _samples(server) -> dict[str, list[tuple[dict[str, str], float]]]:
    """`/metrics` as {name: [(labels, value)]}."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        match = re.fullmatch(r"([^\s{]+)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            found.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return found


def _stream(server, model: str, tokens: int, started: threading.Event, results: dict) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count slowly."}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=300) as answer:
        results[model, "status"] = answer.status_code
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                started.set()
                chunk = json.loads(line.removeprefix("data: "))
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    results[model, "finished"] = chunk["choices"][0]["finish_reason"]
                if chunk.get("usage"):
                    results[model, "tokens"] = chunk["usage"]["completion_tokens"]


def test_the_gateways_metrics_say_what_runs_and_what_waits(launch_server, random_adapter, tmp_path):
    """One sequence runs at a time (--max-running 1): the first adapter's request runs, the other
    two wait, and the gauges say exactly that."""
    server = launch_server("--max-running", "1", "--max-gpu-adapters", str(MAX_GPU_ADAPTERS))
    for n, name in enumerate(("first", "second", "third")):
        folder = random_adapter(tmp_path / name, seed=n)
        files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir())]
        assert httpx.post(f"{server.base_url}/v1/adapters", data={"id": name}, files=files).status_code == 201
    results: dict = {}
    started = threading.Event()
    first = threading.Thread(target=_stream, args=(server, "first", 400, started, results))
    first.start()
    assert started.wait(120)
    waiting = [
        threading.Thread(target=_stream, args=(server, name, 2, threading.Event(), results))
        for name in ("second", "third")
    ]
    for t in waiting:
        t.start()

    def snapshot():
        samples = _samples(server)
        return samples if samples["vllm:num_requests_waiting"][0][1] == 2 else None

    deadline = time.monotonic() + 60
    while (samples := snapshot()) is None:
        assert time.monotonic() < deadline, "the two requests never waited"
        time.sleep(0.05)
    (labels, running), *_ = samples["vllm:num_requests_running"]
    assert labels == {"model_name": "SmolLM2-135M-Instruct"} and running == 1
    (info_labels, stamp), *others = samples["vllm:lora_requests_info"]
    assert others == []  # one series: the newest
    assert info_labels == {
        "max_lora": str(MAX_GPU_ADAPTERS),
        "running_lora_adapters": "first",
        "waiting_lora_adapters": "second,third",
    }
    assert abs(stamp - time.time()) < 30
    used = samples["plait_kv_blocks_used"][0][1]
    total = samples["plait_kv_blocks_total"][0][1]
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert samples[name][0][1] == used / total and 0 < used / total < 1

    for t in (first, *waiting):
        t.join(300)
    assert results["first", "finished"] == "length" and results["second", "finished"] == "length"
    httpx.post(
        f"{server.base_url}/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1}
    )  # a step after the others ended, which sets the gauges again
    after = _samples(server)
    assert after["vllm:num_requests_waiting"][0][1] == 0 and after["vllm:num_requests_running"][0][1] == 0
    assert after["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == ""


def test_model_cards_carry_the_fields_gateways_read(server):
    cards = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    base = cards[0]
    assert (base["root"], base["parent"]) == (base["id"], None) and base["max_model_len"] > 0


def test_sigterm_finishes_the_requests_in_flight_and_refuses_new_ones(launch_server):
    server = launch_server()
    results: dict = {}
    started = threading.Event()
    model = "SmolLM2-135M-Instruct"
    running = threading.Thread(target=_stream, args=(server, model, 48, started, results))
    running.start()
    assert started.wait(120)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{server.base_url}/health")).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health.status_code == 503
    refused = httpx.post(f"{server.base_url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
    assert refused.status_code == 503 and refused.json()["error"]["code"]
    running.join(120)
    assert results[model, "status"] == 200 and results[model, "finished"] == "length"
    assert results[model, "tokens"] == 48  # every token it asked for
    assert server.process.wait(timeout=60) == 0
