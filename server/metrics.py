"""Prometheus metrics, one registry per server so tests can start several in one process.

Besides Plait's own (`plait_*`), the gauges the Kubernetes Gateway API Inference Extension's
endpoint picker reads, under vLLM's names and with their meaning (its "Model Server Protocol",
proposal 003): requests waiting and running, the KV pool's use as a fraction, and
`vllm:lora_requests_info`, whose one series names the adapters of running and of waiting
requests in its labels and carries the time it was set as its value.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        """`model_name` labels the vLLM-named gauges, as vLLM labels them."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        self.requests = Counter(
            "plait_requests", "Generation requests by how they ended", ["finish_reason"], registry=r
        )
        self.rejected = Counter("plait_requests_rejected", "Requests refused by admission control", registry=r)
        self.prompt_tokens = Counter("plait_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("plait_generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("plait_preemptions", "Sequences preempted for KV space", registry=r)
        # vLLM's names, which its dashboards and the inference gateway read.
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r
        )
        self.time_to_first_token = Histogram(
            "plait_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.time_per_output_token = Histogram(
            "plait_time_per_output_token_seconds",
            "Mean time between output tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "plait_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("plait_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("plait_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_blocks_used = Gauge("plait_kv_blocks_used", "KV pool blocks in use", registry=r)
        self.kv_blocks_total = Gauge("plait_kv_blocks_total", "KV pool blocks in all", registry=r)
        self.batch_tokens = Histogram(
            "plait_step_batch_tokens",
            "Tokens in one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            registry=r,
        )

        self.adapter_loads = Counter(
            "plait_adapter_loads", "Adapters copied into a device slot", ["adapter"], registry=r
        )
        self.adapter_evictions = Counter(
            "plait_adapter_evictions", "Adapters evicted from a device slot", ["adapter"], registry=r
        )
        self.adapters_resident = Gauge("plait_adapters_resident", "Adapters in device slots", registry=r)
        self.running_by_adapter = Gauge(
            "plait_adapter_requests_running", "Running requests by adapter", ["adapter"], registry=r
        )
        self.waiting_by_adapter = Gauge(
            "plait_adapter_requests_waiting", "Waiting requests by adapter", ["adapter"], registry=r
        )

        labels = ["model_name"]
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be admitted", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV pool use, 0 to 1", labels, registry=r)
        self.gpu_cache_usage = Gauge(
            "vllm:gpu_cache_usage_perc", "KV pool use, 0 to 1 (older name)", labels, registry=r
        )
        self.lora_requests_info = Gauge(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests; the value is when it was set",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )

    def set_load(self, running: int, waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_blocks_used.set(kv_blocks_used)
        self.vllm_running.labels(self.model_name).set(running)
        self.vllm_waiting.labels(self.model_name).set(waiting)
        usage = kv_blocks_used / kv_blocks_total if kv_blocks_total else 0.0
        self.kv_usage.labels(self.model_name).set(usage)
        self.gpu_cache_usage.labels(self.model_name).set(usage)

    def set_requests_by_adapter(self, running, waiting, max_lora: int) -> None:
        """Running and waiting counts per adapter id, from each request's (adapter key, weight) pairs,
        and the same ids as `vllm:lora_requests_info` (`max_lora`: adapters one batch can hold)."""
        ids = []
        for gauge, requests in ((self.running_by_adapter, running), (self.waiting_by_adapter, waiting)):
            counts: dict[str, int] = {}
            for pairs in requests:
                for key, _ in pairs:
                    counts[key.adapter_id] = counts.get(key.adapter_id, 0) + 1
            gauge.clear()
            for adapter_id, n in counts.items():
                gauge.labels(adapter_id).set(n)
            ids.append(",".join(sorted(counts)))
        self.lora_requests_info.clear()  # one series: the picker takes the newest, and there is only it
        self.lora_requests_info.labels(str(max_lora), *ids).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
