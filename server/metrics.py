"""Prometheus metrics, one registry per server so tests can start several in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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

    def set_requests_by_adapter(self, running, waiting) -> None:
        """Running and waiting counts per adapter id, from each request's (adapter key, weight) pairs."""
        for gauge, requests in ((self.running_by_adapter, running), (self.waiting_by_adapter, waiting)):
            counts: dict[str, int] = {}
            for pairs in requests:
                for key, _ in pairs:
                    counts[key.adapter_id] = counts.get(key.adapter_id, 0) + 1
            gauge.clear()
            for adapter_id, n in counts.items():
                gauge.labels(adapter_id).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
