"""Discrete-event simulation of a fleet of Plait replicas behind four request-routing policies.

    .venv/bin/python bench/sim_fleet.py             # the default study: tables, plot, README section
    .venv/bin/python bench/sim_fleet.py --quick     # the same study at small settings, for development
    .venv/bin/python bench/sim_fleet.py --compare-only --replicas 16 --slots 16 --adapters 100000 --rate 12

The default run does four things and writes bench/results/fleet/{results.txt, fleet.png,
README-section.md}: the four policies compared on one fleet (R=8, S=8, N=10k, 5 requests/s);
a sweep over N (8 to 100k) and one over the Zipf exponent s (0 to 1.2, N=100k) for p99 and slot
hit rate; and, for a few (N, S), the fewest replicas that keep p99 under a target at 20
requests/s. It takes about 50 s on the 2-core development machine; --quick runs the same at
small settings in seconds.

What it models
--------------
R replicas, each a `plait serve` engine as the engine is written (server/engine/engine.py,
scheduler.py, adapter_slots.py):

- Continuous batching. The engine loop reads its inbox, admits waiting requests in arrival
  order while fewer than --max-running run, runs one step for every running sequence, then
  publishes its gauges. A request that arrives during a step waits in the inbox until the step
  ends. Every step gives each running request one output token; a request of T tokens runs T
  steps (its prefill is folded into the per-step cost, as the end-to-end figures below fold it).
- Step cost grows with the number of running sequences b and the number of distinct adapters d
  in the batch: step(b, d) = base(b) + base(16) * (lora_fixed + lora_per_adapter * d) for d > 0.
- Adapters in three tiers, as AdapterSlots keeps them: S device slots (least recently used,
  a slot pinned while a running request uses it; a request is admitted only once its adapter
  holds a slot, and the requests behind it are admitted meanwhile), a CPU cache of
  --cpu-adapters parsed adapters (LRU), and the adapter's files. A request whose adapter is in
  neither starts a read on the replica's one reader thread (FIFO); the read costs the
  "local copy" figure when this replica has served the adapter before and the "object store"
  figure the first time. Reads never block steps. Moving an adapter from the CPU cache into a
  slot happens on the engine thread and costs --slot-copy-s, added to that step.
- Admission control: a replica with --max-waiting requests waiting refuses more (HTTP 429).
- Zipf popularity (exponent s) over N adapters, Poisson arrivals at a total rate lambda.

Routing policies:

1. round-robin;
2. least-queued: fewest of its own requests in flight (waiting + running), exact, as a
   proxy that counts what it sent knows them; ties broken at random;
3. gie: the Kubernetes Gateway API Inference Extension's endpoint picker for a Critical request,
   v0.3.0 (commit d172cbb082f2e9870faf0d97f650b9a454514fef), pkg/epp/scheduling/scheduler.go
   and filter.go: low-queueing filter (waiting < QUEUING_THRESHOLD_LORA = 128) -> LoRA soft
   affinity (pods whose `vllm:lora_requests_info` names the adapter among running or waiting
   ones, with probability LORA_AFFINITY_THRESHOLD = 0.999, else pods with fewer active adapters
   than `max_lora`; whichever group is non-empty otherwise) -> least queuing (pods within
   (max - min) // pods of the minimum waiting count, integer division as in Go) -> least KV
   cache (within (max - min) / pods of the minimum usage) -> a uniformly random survivor; if
   every pod queues 128 or more: least queuing -> soft affinity -> least KV cache. It reads
   stale metrics: each pod is scraped every 50 ms (runserver.go DefaultRefreshMetricsInterval)
   at its own phase, stale metrics count as fresh (backend/metrics/logger.go), and Plait
   publishes its gauges once per engine step (engine.py `_update_gauges`), so what the picker
   sees is the replica's state at its last step end before the last scrape. A scrape whose
   `lora_requests_info` names no adapter at all is skipped by getLatestLoraMetric
   (backend/metrics/metrics.go), so an idle pod keeps showing its last adapters; that is
   modelled too. `max_lora` is S (Plait publishes its slot count). The sheddable-request
   branch (KV_CACHE_THRESHOLD 0.8, QUEUE_THRESHOLD_CRITICAL 5) drops requests and is not used:
   every request is Critical. The picker does not count the requests it sent since the last
   scrape, so a burst within 50 ms all sees the same numbers (that is how it is written).
   v0.5.0 (38577e610ea3ec0d234dd802c7f9b583ece861e5) moved the same filter to
   framework/plugins/filter/lora_affinity_filter.go with the same thresholds; it keeps running
   and waiting adapters apart and counts both against max_lora, which differs from v0.3.0 only
   for an adapter both running and waiting on one pod.
4. bounded-load: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
   "Consistent Hashing with Bounded Loads", SODA 2018): a ring of --vnodes points per replica,
   the adapter id hashed onto it, the request goes to the first replica clockwise holding fewer
   than ceil((1 + epsilon) * m / R) of the m requests in flight (the new one included).

Where the costs come from (all on this project's 2-core Xeon CPU, SmolLM2-135M NF4)
----------------------------------------------------------------------------------
- base(b): bench/results/serving/results.txt, `plait auto` column: 16.3, 52.7 and 144.3 tokens/s
  at 1, 4 and 16 concurrent requests of 64 tokens -> 61, 76 and 111 ms per step; linear between,
  and past 16 along the 4-to-16 slope (not measured).
- lora_fixed = 0.267 and lora_per_adapter = 0.054 (fractions of base(16)):
  bench/results/adapters/bench_adapters.txt, Plait / no adapter = 0.78, 0.60, 0.55 at 16 in
  flight with N = 1, 8, 64, which the README's "Many adapters" section says name 1, 6 and 11
  distinct adapters per batch on average: 1/0.78 = 1.28, 1/0.60 = 1.67, 1/0.55 = 1.82, and the
  least-squares line 1.267 + 0.054 d gives 1.32 / 1.59 / 1.86 at d = 1, 6, 11.
  bench_lora_cpu.py's in-process decode step (kernels/README.md: 0.80 / 0.80 / 0.72 / 0.67 at
  d = 1, 2, 4, 8, i.e. 1.25 / 1.25 / 1.39 / 1.49) lies below the line (1.32 / 1.37 / 1.48 /
  1.70): the served figures include prefills and slot loads, so the line errs towards cost.
- load_local_s = 0.160, load_store_s = 0.223: bench/results/replicas/results.txt, a one-token
  first answer naming an adapter the replica must read, p50 221 ms from its local copy and
  284 ms from the object store (moto S3 on loopback), less one batch-1 step (61 ms, above).
- slot_copy_s = 0: not measured separately; the load figures above include it.
- --max-running 64, --max-waiting 256, --cpu-adapters 32, --slots 8, 32768 KV tokens: Plait's
  `plait serve` defaults (README, flags table).

No GPU figure exists in the repository (kernels/README.md: "GPU figures: still to be measured"),
so there is no --gpu preset: absolute latencies are those of the 2-core CPU machine; the point
is the comparison between policies under the same costs. Every cost is a flag.

What it does not model
----------------------
Prompt lengths and prefill chunking (the token budget), preemption for KV space, prefix
caching, different output lengths (every request has --tokens tokens), network and proxy
delay, replica failures, fusions and merged adapters, a local disk cache that fills up, the
gauges' own cost, and the GIE's later scorer-based profiles (prefix-cache scorer etc.). The
step-cost line is fitted on at most 11 adapters of 6.9 MB (ranks 8-64 on q/k/v/o) while the
load figures are for 18.7 MiB adapters (rank 16 on every projection); larger slot counts
extrapolate the line.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import platform
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

POLICIES = ("round-robin", "least-queued", "gie", "bounded-load")
GIE_SOURCE = (
    "kubernetes-sigs/gateway-api-inference-extension v0.3.0 (d172cbb082f2e9870faf0d97f650b9a454514fef): "
    "pkg/epp/scheduling/scheduler.go, filter.go; pkg/epp/backend/metrics/metrics.go; pkg/epp/server/runserver.go"
)

# --- parameters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Seconds per engine step and per adapter read; defaults are Plait's measured CPU figures."""

    base_step: tuple[tuple[int, float], ...] = ((1, 1 / 16.3), (4, 4 / 52.7), (16, 16 / 144.3))
    lora_ref_batch: int = 16
    lora_fixed: float = 0.267
    lora_per_adapter: float = 0.054
    load_local_s: float = 0.221 - 1 / 16.3
    load_store_s: float = 0.284 - 1 / 16.3
    slot_copy_s: float = 0.0

    def base_s(self, batch: int) -> float:
        """Step time of `batch` sequences with no adapter: linear between the measured points,
        along the last segment's slope past the largest."""
        xs = [b for b, _ in self.base_step]
        ys = [s for _, s in self.base_step]
        if batch <= xs[-1]:
            return float(np.interp(batch, xs, ys))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (batch - xs[-1])

    def lora_s(self, distinct: int) -> float:
        """What `distinct` adapters add to a step, whatever its size (their weights are read once)."""
        if distinct == 0:
            return 0.0
        return self.base_s(self.lora_ref_batch) * (self.lora_fixed + self.lora_per_adapter * distinct)


@dataclass(frozen=True)
class Fleet:
    replicas: int = 8
    slots: int = 8
    cpu_adapters: int = 32
    max_running: int = 64
    max_waiting: int = 256
    kv_tokens: int = 32768


@dataclass(frozen=True)
class Workload:
    adapters: int = 10_000
    zipf_s: float = 1.0
    rate: float = 5.0  # requests per second, the whole fleet
    requests: int = 40_000
    warmup: float = 0.2  # fraction of requests (the first ones) left out of the statistics
    tokens: int = 64  # output tokens per request
    prompt_tokens: int = 32  # only for the KV-cache gauge the GIE reads


@dataclass(frozen=True)
class RouterConfig:
    gie_refresh_s: float = 0.05
    gie_queue_threshold_lora: int = 128
    gie_affinity_threshold: float = 0.999
    epsilon: float = 0.25
    vnodes: int = 100


@dataclass(frozen=True)
class Scenario:
    costs: Costs = field(default_factory=Costs)
    fleet: Fleet = field(default_factory=Fleet)
    workload: Workload = field(default_factory=Workload)
    router: RouterConfig = field(default_factory=RouterConfig)
    seed: int = 0


@dataclass(frozen=True)
class Result:
    policy: str
    replicas: int
    slots: int
    adapters: int
    zipf_s: float
    rate: float
    p50_s: float
    p99_s: float
    mean_s: float
    hit_rate: float  # measured requests whose adapter held a slot on the chosen replica at arrival
    loads_per_s: float  # adapters moved into a device slot, whole fleet
    store_reads_per_s: float  # reads from the object store, whole fleet
    rejected: float  # fraction refused with 429
    distinct_per_step: float  # distinct adapters in an engine step, averaged over steps
    busiest_over_mean: float  # requests in flight on the busiest replica over the mean, seen at arrivals
    measured: int
    wall_s: float


# --- the simulated fleet ----------------------------------------------------------------------


class Request:
    __slots__ = ("index", "adapter", "arrival", "start_step")

    def __init__(self, index: int, adapter: int, arrival: float) -> None:
        self.index = index
        self.adapter = adapter
        self.arrival = arrival
        self.start_step = 0  # the replica's step index when it was admitted


class Replica:
    """One engine: its queues, slots, CPU cache, reader thread, and the gauges it publishes."""

    def __init__(self, index: int, scrape_phase: float) -> None:
        self.index = index
        self.busy = False  # a step is running
        self.step = 0  # index of the step now running (or the next one)
        self.finishing: dict[int, list[Request]] = {}  # step index -> requests whose last token it makes
        self.inbox: list[Request] = []
        self.waiting: list[Request] = []
        self.waiting_by_adapter: dict[int, int] = {}
        self.running = 0
        self.start_sum = 0  # sum of running requests' start steps (for the KV gauge)
        self.resident: OrderedDict[int, int] = OrderedDict()  # adapter -> pins, least recently used first
        self.pinned = 0  # resident adapters with pins > 0: distinct adapters in the batch
        self.cpu: OrderedDict[int, None] = OrderedDict()
        self.reading: dict[int, bool] = {}  # adapter -> read finished (result not yet taken)
        self.read_queue: deque[int] = deque()
        self.reader_busy = False
        self.local: set[int] = set()  # adapters with a local copy on this replica's disk
        self.inflight = 0  # routed here and not finished (what a proxy counts)
        # Gauges as last published, and as the GIE picker last scraped them.
        self.scrape_phase = scrape_phase
        self.gauge_time = -math.inf
        self.gauges: tuple[int, float, frozenset[int]] = (0, 0.0, frozenset())
        self.view: tuple[int, float, frozenset[int]] = (0, 0.0, frozenset())


class Uniforms:
    """numpy uniforms drawn in blocks: one Generator call per draw would dominate the run time."""

    def __init__(self, rng: np.random.Generator, block: int = 1 << 16) -> None:
        self.rng = rng
        self.block = block
        self.values = rng.random(block).tolist()
        self.next_index = 0

    def draw(self) -> float:
        if self.next_index == self.block:
            self.values = self.rng.random(self.block).tolist()
            self.next_index = 0
        value = self.values[self.next_index]
        self.next_index += 1
        return value

    def pick(self, items: Sequence[int]) -> int:
        return items[int(self.draw() * len(items))]


def zipf_adapters(rng: np.random.Generator, adapters: int, s: float, n: int) -> np.ndarray:
    """n adapter ids in 0..adapters-1, id k drawn with probability proportional to (k + 1)^-s."""
    weights = np.arange(1, adapters + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights)
    return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=adapters - 1)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (Steele et al.'s SplitMix64 finaliser), vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# --- routing policies -------------------------------------------------------------------------


class Policy:
    name = ""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def choose(self, t: float, adapter: int) -> int:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.next_replica = 0

    def choose(self, t: float, adapter: int) -> int:
        chosen = self.next_replica
        self.next_replica = (chosen + 1) % len(self.sim.replicas)
        return chosen


class LeastQueued(Policy):
    name = "least-queued"

    def choose(self, t: float, adapter: int) -> int:
        loads = [r.inflight for r in self.sim.replicas]
        low = min(loads)
        return self.sim.uniforms.pick([i for i, load in enumerate(loads) if load == low])


class GatewayInferenceExtension(Policy):
    """The GIE v0.3.0 decision tree for a Critical request, on scraped (stale) gauges."""

    name = "gie"

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        self.config = sim.scenario.router
        self.max_lora = sim.scenario.fleet.slots

    def choose(self, t: float, adapter: int) -> int:
        views = [self.sim.scraped(r, t) for r in self.sim.replicas]
        pods = list(range(len(views)))
        low = [p for p in pods if views[p][0] < self.config.gie_queue_threshold_lora]
        if low:  # "low queueing filter" -> "affinity LoRA" -> least queuing -> least KV cache
            candidates = self.soft_affinity(low, views, adapter) or low
            candidates = self.least_kv(self.least_queuing(candidates, views), views)
        else:  # every pod queues: least queuing -> "low cost LoRA" -> least KV cache
            candidates = self.least_queuing(pods, views)
            candidates = self.least_kv(self.soft_affinity(candidates, views, adapter) or candidates, views)
        return self.sim.uniforms.pick(candidates)

    def soft_affinity(self, pods: list[int], views, adapter: int) -> list[int]:
        """Pods running or queueing this adapter, else pods with room for another (empty: the
        filter failed, and the caller passes its own input on, as the Go tree does)."""
        affinity = [p for p in pods if adapter in views[p][2]]
        available = [p for p in pods if p not in affinity and len(views[p][2]) < self.max_lora]
        if affinity and available:
            return affinity if self.sim.uniforms.draw() < self.config.gie_affinity_threshold else available
        return affinity or available

    @staticmethod
    def least_queuing(pods: list[int], views) -> list[int]:
        queues = [views[p][0] for p in pods]
        low, high = min(queues), max(queues)
        return [p for p, q in zip(pods, queues, strict=True) if q <= low + (high - low) // len(pods)]

    @staticmethod
    def least_kv(pods: list[int], views) -> list[int]:
        usage = [views[p][1] for p in pods]
        low, high = min(usage), max(usage)
        return [p for p, u in zip(pods, usage, strict=True) if u <= low + (high - low) / len(pods)]


class BoundedLoadHashing(Policy):
    """Consistent hashing with bounded loads over the router's own in-flight counts."""

    name = "bounded-load"

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim)
        replicas = len(sim.replicas)
        vnodes = sim.scenario.router.vnodes
        self.epsilon = sim.scenario.router.epsilon
        owners = np.repeat(np.arange(replicas, dtype=np.uint64), vnodes)
        vnode = np.tile(np.arange(vnodes, dtype=np.uint64), replicas)
        # Ring points hash (replica, vnode) pairs; the offset keeps them apart from adapter ids.
        points = splitmix64(owners * np.uint64(1_000_003) + vnode + np.uint64(1 << 40))
        order = np.argsort(points)
        self.ring_owners = [int(o) for o in owners[order]]
        # Each adapter's point on the ring, found once for all of them.
        adapter_points = splitmix64(np.arange(sim.scenario.workload.adapters, dtype=np.uint64))
        self.positions = np.searchsorted(points[order], adapter_points).tolist()
        self.preference_cache: dict[int, list[int]] = {}
        self.worst_excess = -math.inf  # max over decisions of (chosen replica's load after - cap)
        self.overflows = 0  # requests that went past the first replica on their adapter's walk

    def preference(self, adapter: int) -> list[int]:
        """Replicas in the order met walking clockwise from the adapter's point, each once."""
        position = self.positions[adapter] % len(self.ring_owners)
        cached = self.preference_cache.get(position)
        if cached is None:
            seen: list[int] = []
            ring = self.ring_owners
            for k in range(len(ring)):
                owner = ring[(position + k) % len(ring)]
                if owner not in seen:
                    seen.append(owner)
                    if len(seen) == len(self.sim.replicas):
                        break
            cached = self.preference_cache[position] = seen
        return cached

    def cap(self) -> int:
        in_flight = self.sim.inflight + 1  # the new request counts
        return math.ceil((1 + self.epsilon) * in_flight / len(self.sim.replicas))

    def choose(self, t: float, adapter: int) -> int:
        cap = self.cap()
        for k, r in enumerate(self.preference(adapter)):
            if self.sim.replicas[r].inflight < cap:
                self.worst_excess = max(self.worst_excess, self.sim.replicas[r].inflight + 1 - cap)
                self.overflows += k > 0
                return r
        raise AssertionError("the bound always leaves room: R * cap >= (1 + epsilon) * in-flight")


POLICY_CLASSES: dict[str, Callable[[Simulation], Policy]] = {
    cls.name: cls for cls in (RoundRobin, LeastQueued, GatewayInferenceExtension, BoundedLoadHashing)
}

STEP_END, READ_END = 0, 1


class Simulation:
    def __init__(self, scenario: Scenario, policy: str, give_up_above_s: float | None = None) -> None:
        """`give_up_above_s`: stop as soon as more than 1% of the measured requests (plus two, for
        the percentile's interpolation) took longer, or were refused; p99 is then infinite."""
        self.scenario = scenario
        fleet, work = scenario.fleet, scenario.workload
        rng = np.random.default_rng(scenario.seed)
        # Arrivals and adapters come first from the seed, so every policy sees the same stream.
        self.arrivals = np.cumsum(rng.exponential(1 / work.rate, work.requests)).tolist()
        self.adapters = zipf_adapters(rng, work.adapters, work.zipf_s, work.requests).tolist()
        phases = rng.random(fleet.replicas) * scenario.router.gie_refresh_s
        self.uniforms = Uniforms(np.random.default_rng([scenario.seed, POLICIES.index(policy)]))
        self.replicas = [Replica(i, float(phases[i])) for i in range(fleet.replicas)]
        self.base = [scenario.costs.base_s(b) for b in range(fleet.max_running + 1)]
        self.lora = [scenario.costs.lora_s(d) for d in range(fleet.slots + 1)]
        self.policy = POLICY_CLASSES[policy](self)
        self.publishes = isinstance(self.policy, GatewayInferenceExtension)
        self.events: list[tuple[float, int, int, int, int]] = []
        self.sequence = 0
        self.inflight = 0
        self.measure_from = int(work.warmup * work.requests)
        self.latencies: list[float] = []
        self.hits = 0
        self.rejected = 0
        self.loads = 0
        self.store_reads = 0
        self.steps = 0
        self.distinct_sum = 0
        self.busiest_sum = 0  # requests in flight on the busiest replica, summed over measured arrivals
        self.inflight_sum = 0  # and on all replicas
        self.measuring = False
        self.give_up_above_s = math.inf if give_up_above_s is None else give_up_above_s
        self.too_slow_allowed = 0.01 * (work.requests - self.measure_from) + 2
        self.too_slow = 0

    # -- the event loop --

    def run(self) -> Result:
        started = time.perf_counter()
        arrivals, adapters, events = self.arrivals, self.adapters, self.events
        # Loads and reads are counted while requests are being measured, from the first measured
        # arrival to the last arrival; latencies and hits for every measured request.
        window_start, window_end = arrivals[self.measure_from], arrivals[-1]
        next_request = 0
        while self.too_slow <= self.too_slow_allowed:
            if next_request < len(arrivals) and (not events or arrivals[next_request] < events[0][0]):
                t = arrivals[next_request]
                self.measuring = window_start <= t <= window_end
                self.arrive(Request(next_request, adapters[next_request], t))
                next_request += 1
            elif events:
                t, _, kind, replica, adapter = heapq.heappop(events)
                self.measuring = window_start <= t <= window_end
                if kind == STEP_END:
                    self.step_end(self.replicas[replica], t)
                else:
                    self.read_end(self.replicas[replica], adapter, t)
            else:
                break
        return self.result(time.perf_counter() - started)

    def push(self, t: float, kind: int, replica: Replica, adapter: int = -1) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (t, self.sequence, kind, replica.index, adapter))

    def arrive(self, req: Request) -> None:
        replica = self.replicas[self.policy.choose(req.arrival, req.adapter)]
        if req.index >= self.measure_from:
            self.hits += req.adapter in replica.resident
            self.busiest_sum += max(r.inflight for r in self.replicas)
            self.inflight_sum += self.inflight
        replica.inflight += 1
        self.inflight += 1
        replica.inbox.append(req)
        if not replica.busy:  # the engine loop blocks on its inbox only when idle
            self.iterate(replica, req.arrival)

    def step_end(self, replica: Replica, t: float) -> None:
        for req in replica.finishing.pop(replica.step, ()):
            self.finish(replica, req, t)
        replica.step += 1
        replica.busy = False
        self.publish(replica, t)
        self.iterate(replica, t)

    def read_end(self, replica: Replica, adapter: int, t: float) -> None:
        replica.reading[adapter] = True
        replica.local.add(adapter)
        replica.reader_busy = False
        self.start_read(replica, t)
        if not replica.busy:  # the read's callback wakes an idle engine
            self.iterate(replica, t)

    # -- one replica's engine --

    def iterate(self, replica: Replica, t: float) -> None:
        """One pass of the engine loop: take the inbox, admit what can run, start a step."""
        max_waiting = self.scenario.fleet.max_waiting
        for req in replica.inbox:
            if len(replica.waiting) >= max_waiting:
                self.reject(replica, req)
            else:
                replica.waiting.append(req)
                replica.waiting_by_adapter[req.adapter] = replica.waiting_by_adapter.get(req.adapter, 0) + 1
        replica.inbox.clear()
        copies = self.schedule(replica, t)
        if replica.running:
            duration = self.base[replica.running] + self.lora[replica.pinned] + copies * self.scenario.costs.slot_copy_s
            replica.busy = True
            self.push(t + duration, STEP_END, replica)
            if self.measuring:
                self.steps += 1
                self.distinct_sum += replica.pinned
        else:
            self.publish(replica, t)

    def schedule(self, replica: Replica, t: float) -> int:
        """Admit waiting requests in order while there is room; returns slot copies made."""
        fleet = self.scenario.fleet
        if replica.running >= fleet.max_running or not replica.waiting:
            return 0
        copies = 0
        kept: list[Request] = []
        waiting = replica.waiting
        for i, req in enumerate(waiting):
            if replica.running >= fleet.max_running:
                kept.extend(waiting[i:])
                break
            acquired = self.acquire(replica, req.adapter, t)
            if acquired is None:
                kept.append(req)  # its adapter is not ready: the ones behind it go first
                continue
            copies += acquired
            self.admit(replica, req)
        replica.waiting = kept
        return copies

    def acquire(self, replica: Replica, adapter: int, t: float) -> int | None:
        """Pin a slot holding `adapter` (1 if it had to be copied in, 0 if resident), or None."""
        resident = replica.resident
        pins = resident.get(adapter)
        if pins is not None:
            if pins == 0:
                replica.pinned += 1
            resident[adapter] = pins + 1
            resident.move_to_end(adapter)
            return 0
        if not self.from_cpu(replica, adapter, t):
            return None
        if len(resident) >= self.scenario.fleet.slots:
            victim = next((a for a, p in resident.items() if p == 0), None)
            if victim is None:
                return None  # every slot is pinned by a running request
            del resident[victim]
        resident[adapter] = 1
        replica.pinned += 1
        if self.measuring:
            self.loads += 1
        return 1

    def from_cpu(self, replica: Replica, adapter: int, t: float) -> bool:
        """Whether the adapter is parsed in CPU memory; starts its read when it is not."""
        cpu = replica.cpu
        if adapter in cpu:
            cpu.move_to_end(adapter)
            return True
        done = replica.reading.get(adapter)
        if done is None:
            replica.reading[adapter] = False
            replica.read_queue.append(adapter)
            self.start_read(replica, t)
            return False
        if not done:
            return False
        del replica.reading[adapter]
        cpu[adapter] = None
        while len(cpu) > self.scenario.fleet.cpu_adapters:
            cpu.popitem(last=False)
        return True

    def start_read(self, replica: Replica, t: float) -> None:
        if replica.reader_busy or not replica.read_queue:
            return
        adapter = replica.read_queue.popleft()
        costs = self.scenario.costs
        if adapter in replica.local:
            cost = costs.load_local_s
        else:
            cost = costs.load_store_s
            if self.measuring:
                self.store_reads += 1
        replica.reader_busy = True
        self.push(t + cost, READ_END, replica, adapter)

    def admit(self, replica: Replica, req: Request) -> None:
        count = replica.waiting_by_adapter[req.adapter] - 1
        if count:
            replica.waiting_by_adapter[req.adapter] = count
        else:
            del replica.waiting_by_adapter[req.adapter]
        replica.running += 1
        req.start_step = replica.step
        replica.start_sum += replica.step
        last = replica.step + self.scenario.workload.tokens - 1
        replica.finishing.setdefault(last, []).append(req)

    def finish(self, replica: Replica, req: Request, t: float) -> None:
        pins = replica.resident[req.adapter] - 1
        replica.resident[req.adapter] = pins
        if pins == 0:
            replica.pinned -= 1
        replica.running -= 1
        replica.start_sum -= req.start_step
        replica.inflight -= 1
        self.inflight -= 1
        if req.index >= self.measure_from:
            self.latencies.append(t - req.arrival)
            if t - req.arrival > self.give_up_above_s:
                self.too_slow += 1

    def reject(self, replica: Replica, req: Request) -> None:
        replica.inflight -= 1
        self.inflight -= 1
        if req.index >= self.measure_from:
            self.rejected += 1
            self.too_slow += 1

    # -- gauges and the GIE's view of them --

    def last_scrape(self, replica: Replica, t: float) -> float:
        period = self.scenario.router.gie_refresh_s
        if t < replica.scrape_phase:
            return -math.inf
        return replica.scrape_phase + math.floor((t - replica.scrape_phase) / period) * period

    def publish(self, replica: Replica, t: float) -> None:
        """What `_update_gauges` sets after each engine pass: waiting count, KV use, and the
        adapters of running and waiting requests (`vllm:lora_requests_info`)."""
        if not self.publishes:
            return
        self.scraped(replica, t)  # a scrape since the last publish saw the old gauges: keep that
        work = self.scenario.workload
        tokens = replica.running * (work.prompt_tokens + replica.step) - replica.start_sum
        active = frozenset(a for a, p in replica.resident.items() if p) | replica.waiting_by_adapter.keys()
        replica.gauges = (len(replica.waiting), tokens / self.scenario.fleet.kv_tokens, active)
        replica.gauge_time = t

    def scraped(self, replica: Replica, t: float) -> tuple[int, float, frozenset[int]]:
        """The gauges as the picker holds them at t: those published before its last scrape."""
        if self.last_scrape(replica, t) >= replica.gauge_time:
            waiting, kv, active = replica.gauges
            # getLatestLoraMetric skips a series naming no adapter: the last named ones stay.
            replica.view = (waiting, kv, active or replica.view[2])
        return replica.view

    # -- statistics --

    def result(self, wall_s: float) -> Result:
        work, fleet = self.scenario.workload, self.scenario.fleet
        measured = work.requests - self.measure_from
        window = self.arrivals[-1] - self.arrivals[self.measure_from]
        latencies = np.array(self.latencies) if self.latencies else np.array([math.nan])
        gave_up = self.too_slow > self.too_slow_allowed
        mean_sum = max(1e-9, self.inflight_sum / len(self.replicas))
        return Result(
            policy=self.policy.name,
            replicas=fleet.replicas,
            slots=fleet.slots,
            adapters=work.adapters,
            zipf_s=work.zipf_s,
            rate=work.rate,
            p50_s=float(np.percentile(latencies, 50)),
            p99_s=math.inf if gave_up else float(np.percentile(latencies, 99)),
            mean_s=float(latencies.mean()),
            hit_rate=self.hits / measured,
            loads_per_s=self.loads / window,
            store_reads_per_s=self.store_reads / window,
            rejected=self.rejected / measured,
            distinct_per_step=self.distinct_sum / max(1, self.steps),
            busiest_over_mean=self.busiest_sum / mean_sum,
            measured=measured,
            wall_s=wall_s,
        )


def simulate(scenario: Scenario, policy: str, give_up_above_s: float | None = None) -> Result:
    return Simulation(scenario, policy, give_up_above_s).run()


# --- the study: comparison, sweeps over N and s, R x S table ------------------------------------


@dataclass(frozen=True)
class Study:
    base: Scenario
    sweep_adapters: tuple[int, ...]
    sweep_zipf: tuple[float, ...]
    sweep_zipf_adapters: int  # N for the sweep over s
    sweep_zipf_rate: float  # lambda for the sweep over s: flat popularity has less capacity
    sweep_requests: int
    table_rate: float
    table_adapters: tuple[int, ...]
    table_slots: tuple[int, ...]
    table_replicas: tuple[int, ...]  # the ladder searched for the smallest R
    table_requests: int
    target_p99_s: float


@dataclass(frozen=True)
class Cell:
    """One entry of the R x S table: the fewest replicas meeting the target, or None."""

    adapters: int
    slots: int
    policy: str
    replicas: int | None
    p99_s: float


@dataclass(frozen=True)
class StudyResults:
    comparison: tuple[Result, ...]
    sweep_n: tuple[Result, ...]
    sweep_s: tuple[Result, ...]
    table: tuple[Cell, ...]

    def row_n(self, adapters: int) -> dict[str, Result]:
        return {r.policy: r for r in self.sweep_n if r.adapters == adapters}

    def row_s(self, zipf_s: float) -> dict[str, Result]:
        return {r.policy: r for r in self.sweep_s if r.zipf_s == zipf_s}

    def cell(self, adapters: int, slots: int, policy: str) -> Cell:
        return next(c for c in self.table if (c.adapters, c.slots, c.policy) == (adapters, slots, policy))


def with_changes(scenario: Scenario, **changes) -> Scenario:
    """A copy with fleet/workload fields changed by name (replicas=, slots=, adapters=, ...)."""
    fleet = {k: v for k, v in changes.items() if k in Fleet.__dataclass_fields__}
    work = {k: v for k, v in changes.items() if k in Workload.__dataclass_fields__}
    return replace(scenario, fleet=replace(scenario.fleet, **fleet), workload=replace(scenario.workload, **work))


def smallest_replicas(study: Study, adapters: int, slots: int, policy: str) -> Cell:
    """Bisect the replica ladder for the fewest replicas meeting the p99 target (p99 falls as
    replicas are added, so the search assumes the ladder is monotone; near the target, noise
    can move the answer by one rung)."""
    ladder = study.table_replicas

    def p99(replicas: int) -> float:
        scenario = with_changes(
            study.base,
            adapters=adapters,
            slots=slots,
            replicas=replicas,
            rate=study.table_rate,
            requests=study.table_requests,
        )
        return simulate(scenario, policy, give_up_above_s=study.target_p99_s).p99_s

    top = p99(ladder[-1])
    if top > study.target_p99_s:
        return Cell(adapters, slots, policy, None, top)
    best, best_p99 = ladder[-1], top
    lo, hi = 0, len(ladder) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        value = p99(ladder[mid])
        if value <= study.target_p99_s:
            best, best_p99, hi = ladder[mid], value, mid
        else:
            lo = mid + 1
    return Cell(adapters, slots, policy, best, best_p99)


def _simulate_job(job: tuple[Scenario, str]) -> Result:
    return simulate(*job)


def _cell_job(job: tuple[Study, int, int, str]) -> Cell:
    return smallest_replicas(*job)


def run_jobs(function: Callable, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [function(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(function, jobs))


def run_study(study: Study, workers: int, log: Callable[[str], None]) -> StudyResults:
    base = study.base
    log("policy comparison ...")
    comparison = run_jobs(_simulate_job, [(base, p) for p in POLICIES], workers)
    log("sweep over N ...")
    sweep_n = run_jobs(
        _simulate_job,
        [
            (with_changes(base, adapters=n, requests=study.sweep_requests), p)
            for n in study.sweep_adapters
            for p in POLICIES
        ],
        workers,
    )
    log("sweep over s ...")
    sweep_s = run_jobs(
        _simulate_job,
        [
            (
                with_changes(
                    base,
                    adapters=study.sweep_zipf_adapters,
                    zipf_s=s,
                    rate=study.sweep_zipf_rate,
                    requests=study.sweep_requests,
                ),
                p,
            )
            for s in study.sweep_zipf
            for p in POLICIES
        ],
        workers,
    )
    log("R x S table ...")
    cells = [(study, n, s, p) for n in study.table_adapters for s in study.table_slots for p in POLICIES]
    table = run_jobs(_cell_job, cells, workers)
    return StudyResults(tuple(comparison), tuple(sweep_n), tuple(sweep_s), tuple(table))


def hot_adapters(adapters: int, s: float, share: float = 0.8) -> int:
    """How many of the most popular adapters carry `share` of the requests."""
    weights = np.arange(1, adapters + 1, dtype=np.float64) ** -s
    return int(np.searchsorted(np.cumsum(weights) / weights.sum(), share) + 1)


# --- reporting ----------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"


def cost_lines(costs: Costs) -> list[str]:
    steps = ", ".join(f"{b}: {s * 1000:.0f} ms" for b, s in costs.base_step)
    return [
        f"engine step with no adapter, by running sequences ({steps}; past {costs.base_step[-1][0]} along the "
        "last slope): bench/results/serving/results.txt, `plait auto` column (64-token requests, 1/4/16 concurrent)",
        f"adapters in a step: base({costs.lora_ref_batch}) x ({costs.lora_fixed:.3f} + {costs.lora_per_adapter:.3f} "
        f"x distinct adapters), {costs.lora_s(1) * 1000:.0f} ms for 1, {costs.lora_s(8) * 1000:.0f} ms for 8: "
        "bench/results/adapters/bench_adapters.txt (Plait / no adapter 0.78, 0.60, 0.55 with 1, 6 and 11 distinct "
        "adapters per batch of 16, README 'Many adapters'; least-squares line)",
        f"adapter read from the replica's local copy {costs.load_local_s * 1000:.0f} ms, from the object store "
        f"{costs.load_store_s * 1000:.0f} ms: bench/results/replicas/results.txt (first answer p50 221 and 284 ms, "
        "less one batch-1 step)",
        f"slot copy on the engine thread {costs.slot_copy_s * 1000:.0f} ms: not measured apart (in the read figures)",
    ]


RESULT_HEADER = (
    f"{'policy':<14}{'p50 s':>9}{'p99 s':>9}{'hit rate':>10}{'loads/s':>10}{'store rd/s':>12}"
    f"{'distinct/step':>15}{'busiest/mean':>14}{'429s':>8}"
)


def fmt_result(r: Result) -> str:
    rejected = f"{r.rejected:8.1%}" if r.rejected else f"{'0':>8}"
    return (
        f"{r.policy:<14}{r.p50_s:9.1f}{r.p99_s:9.1f}{r.hit_rate:10.1%}{r.loads_per_s:10.2f}"
        f"{r.store_reads_per_s:12.2f}{r.distinct_per_step:15.2f}{r.busiest_over_mean:14.2f}{rejected}"
    )


def describe(scenario: Scenario) -> str:
    f, w, g = scenario.fleet, scenario.workload, scenario.router
    return (
        f"R={f.replicas} replicas x S={f.slots} slots, N={w.adapters:,} adapters, Zipf s={w.zipf_s:g}, "
        f"lambda={w.rate:g} req/s, {w.tokens} tokens per request, {w.requests:,} requests "
        f"(first {w.warmup:.0%} left out), CPU cache {f.cpu_adapters}, max running {f.max_running}, "
        f"GIE refresh {g.gie_refresh_s * 1000:.0f} ms, bounded-load epsilon {g.epsilon:g}, seed {scenario.seed}"
    )


def cell_text(study: Study, cell: Cell) -> str:
    if cell.replicas is None:
        return f">{study.table_replicas[-1]}"
    return str(cell.replicas)


def affinity_gap(row: dict[str, Result]) -> tuple[float, float]:
    """(best affinity policy's hit rate minus round robin's, round robin's p99 / best affinity p99)."""
    affinity = [row["gie"], row["bounded-load"]]
    hit_gap = max(r.hit_rate for r in affinity) - row["round-robin"].hit_rate
    return hit_gap, row["round-robin"].p99_s / min(r.p99_s for r in affinity)


def hot_ratio(study: Study, adapters: int, zipf_s: float) -> float:
    """Adapters carrying 80% of requests, per slot of the whole fleet."""
    return hot_adapters(adapters, zipf_s) / (study.base.fleet.replicas * study.base.fleet.slots)


def p99_phrase(ratio: float) -> str:
    """Round robin's p99 over the better affinity policy's, said the way round that reads."""
    if ratio >= 1:
        return f"round robin's p99 is {ratio:.2f}x the better affinity policy's"
    return f"the better affinity policy's p99 is {1 / ratio:.2f}x round robin's"


def sweep_summary(study: Study, results: StudyResults) -> str:
    """What the two sweeps show, in numbers taken from them."""
    s0 = study.base.workload.zipf_s
    ns = sorted(study.sweep_adapters)
    gaps = {n: affinity_gap(results.row_n(n)) for n in ns}
    peak, last = max(ns, key=lambda n: gaps[n][0]), ns[-1]
    lines = [
        f"Over N (s = {s0:g}), the affinity policies' lead in slot hit rate over round robin is largest at "
        f"N = {peak:,} ({gaps[peak][0] * 100:+.0f} points, hot/RS {hot_ratio(study, peak, s0):.2f}; "
        f"{p99_phrase(gaps[peak][1])}) and {gaps[last][0] * 100:+.0f} points at N = {last:,} "
        f"(hot/RS {hot_ratio(study, last, s0):.0f}; {p99_phrase(gaps[last][1])}).",
    ]
    n_s = study.sweep_zipf_adapters
    ss = sorted(study.sweep_zipf)
    rows = {s: results.row_s(s) for s in ss}
    gaps_s = {s: affinity_gap(rows[s]) for s in ss}

    def versus(s: float) -> str:
        rr = rows[s]["round-robin"].p99_s
        return ", ".join(f"{p} {rows[s][p].p99_s / rr:.2f}x" for p in ("gie", "bounded-load"))

    # Where affinity has nothing left to win: under 5 points more hits, at this s and every flatter one.
    flat = None
    for s in ss:
        if gaps_s[s][0] >= 0.05:
            break
        flat = s
    where = f"Over s (N = {n_s:,}, {study.sweep_zipf_rate:g} requests/s)"
    if flat is None:
        lines.append(f"{where}, the affinity policies hit at least 5 points more than round robin at every s tried.")
    else:
        flattest = "" if flat == ss[0] else f"; at s = {ss[0]:g} {versus(ss[0])}"
        lines.append(
            f"{where}, the affinity policies' hit-rate lead is under 5 points for s <= {flat:g} (hot/RS "
            f"{hot_ratio(study, n_s, flat):.0f} and more): slot affinity has nothing left to win there. Their p99 "
            f"against round robin's: at s = {flat:g} {versus(flat)}{flattest}."
        )
    top = ss[-1]
    lines.append(
        f"At s = {top:g} the lead is {gaps_s[top][0] * 100:+.0f} points of hit rate, p99 {versus(top)} round robin's."
    )
    rate, rate_s = study.base.workload.rate, study.sweep_zipf_rate
    if n_s in study.sweep_adapters and s0 in study.sweep_zipf and rate != rate_s:
        high, low = results.row_n(n_s), rows[s0]
        rr, gie = low["round-robin"], low["gie"]
        flips = affinity_gap(high)[1] > 1 > gaps_s[s0][1]
        lines.append(
            f"The same N = {n_s:,} and s = {s0:g} at {rate:g} and at {rate_s:g} requests/s"
            f"{' shows the trade' if flips else ''}: at "
            f"{rate:g}, {p99_phrase(affinity_gap(high)[1])}; at {rate_s:g}, {p99_phrase(gaps_s[s0][1])}. Affinity "
            f"keeps fewer distinct adapters in a step (gie {gie.distinct_per_step:.1f}, round robin "
            f"{rr.distinct_per_step:.1f} at {rate_s:g}), which makes steps cheaper and raises capacity, and it loads "
            f"the busiest replica more (gie {gie.busiest_over_mean:.2f}x the mean, round robin "
            f"{rr.busiest_over_mean:.2f}x), which lengthens the tail while there is capacity to spare."
        )
    return " ".join(lines)


def table_summary(study: Study, results: StudyResults) -> str:
    lines = []
    for n in study.table_adapters:
        for s in study.table_slots:
            cells = {p: results.cell(n, s, p) for p in POLICIES}
            met = [c for c in cells.values() if c.replicas is not None]
            if not met:
                lines.append(f"N = {n:,}, S = {s}: no policy meets the target with {study.table_replicas[-1]}.")
                continue
            fewest = min(c.replicas for c in met)
            winners = [p for p, c in cells.items() if c.replicas == fewest]
            lines.append(
                f"N = {n:,}, S = {s}: fewest {fewest} ({', '.join(winners)}); round robin "
                f"{cell_text(study, cells['round-robin'])}."
            )
    return " ".join(lines)


def sweep_lines(results: dict[float, dict[str, Result]], key: str, hot: Callable[[float], float]) -> list[str]:
    lines = [
        f"{key:>7}{'hot/RS':>8}  "
        + "".join(f"{'p99 ' + p:>18}" for p in POLICIES)
        + "".join(f"{'hit ' + p:>18}" for p in POLICIES)
    ]
    for value, row in results.items():
        lines.append(
            f"{value:>7g}{hot(value):8.3g}  "
            + "".join(f"{row[p].p99_s:18.1f}" for p in POLICIES)
            + "".join(f"{row[p].hit_rate:18.1%}" for p in POLICIES)
        )
    return lines


def report_text(study: Study, results: StudyResults, wall_s: float, command: str) -> str:
    base = study.base
    s0, n_s = base.workload.zipf_s, study.sweep_zipf_adapters
    lines = [
        f"machine: {machine()}",
        f"command: {command}",
        f"run time: {wall_s:.0f} s (the whole study, one process)",
        "",
        "costs (measured on the 2-core CPU machine above, SmolLM2-135M NF4; each is a flag):",
        *[f"  - {line}" for line in cost_lines(base.costs)],
        f"GIE policy as read in: {GIE_SOURCE}",
        "",
        f"1. policies compared: {describe(base)}",
        "",
        RESULT_HEADER,
        *[fmt_result(r) for r in results.comparison],
        "",
        f"2. sweeps ({study.sweep_requests:,} requests each, otherwise as in 1); hot/RS = adapters carrying 80% of "
        f"requests over the fleet's R x S = {base.fleet.replicas * base.fleet.slots} slots",
        "",
        f"2a. over N, Zipf s = {s0:g}",
        "",
        *sweep_lines(
            {n: results.row_n(n) for n in sorted(study.sweep_adapters)}, "N", lambda n: hot_ratio(study, n, s0)
        ),
        "",
        f"2b. over Zipf s, N = {n_s:,}, lambda={study.sweep_zipf_rate:g} req/s",
        "",
        *sweep_lines({s: results.row_s(s) for s in sorted(study.sweep_zipf)}, "s", lambda s: hot_ratio(study, n_s, s)),
        "",
        sweep_summary(study, results),
        "",
        f"3. fewest replicas R (searched among {list(study.table_replicas)}) for p99 <= {study.target_p99_s:g} s at "
        f"lambda={study.table_rate:g} req/s ({study.table_requests:,} requests each, otherwise as in 1); "
        "'>' = not met with the most; the p99 reached in brackets",
        "",
        f"{'N':>7}{'S':>4}  " + "".join(f"{p:>18}" for p in POLICIES),
    ]
    for n in study.table_adapters:
        for s in study.table_slots:
            texts = []
            for p in POLICIES:
                cell = results.cell(n, s, p)
                texts.append(cell_text(study, cell) + ("" if cell.replicas is None else f" ({cell.p99_s:.1f} s)"))
            lines.append(f"{n:>7}{s:>4}  " + "".join(f"{t:>18}" for t in texts))
    lines += ["", table_summary(study, results)]
    return "\n".join(lines) + "\n"


def plot(study: Study, results: StudyResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, w = study.base.fleet, study.base.workload
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        (axes[0], results.sweep_n, lambda r: r.adapters, f"adapters N (Zipf s = {w.zipf_s:g})", True),
        (
            axes[1],
            results.sweep_s,
            lambda r: r.zipf_s,
            f"Zipf s (N = {study.sweep_zipf_adapters:,}, {study.sweep_zipf_rate:g} requests/s)",
            False,
        ),
    )
    for (ax_p99, ax_hit), sweep, x_of, x_label, log_x in panels:
        for policy in POLICIES:
            rows = sorted((x_of(r), r) for r in sweep if r.policy == policy)
            xs = [x for x, _ in rows]
            ax_p99.plot(xs, [r.p99_s for _, r in rows], marker="o", label=policy)
            ax_hit.plot(xs, [100 * r.hit_rate for _, r in rows], marker="o", label=policy)
        for ax, label in ((ax_p99, "p99 latency, s (2-core CPU costs)"), (ax_hit, "slot hit rate, %")):
            if log_x:
                ax.set_xscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        ax_p99.set_ylim(bottom=0)
        ax_hit.set_ylim(0, 100)
    axes[0][1].legend()
    fig.suptitle(
        f"Simulated fleet: {f.replicas} Plait replicas x {f.slots} adapter slots, "
        f"{w.rate:g} requests/s of {w.tokens} tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_sweep(rows: dict[float, dict[str, Result]], label: str, hot: Callable[[float], float]) -> str:
    head = f"| {label} | hot/RS | " + " | ".join(f"p99 {p}" for p in POLICIES) + " | "
    head += " | ".join(f"hit {p}" for p in POLICIES) + " |"
    lines = [head, "|" + "---:|" * (2 + 2 * len(POLICIES))]
    for value, row in rows.items():
        lines.append(
            f"| {value:,} | {hot(value):.3g} | "
            + " | ".join(f"{row[p].p99_s:.1f} s" for p in POLICIES)
            + " | "
            + " | ".join(f"{row[p].hit_rate:.0%}" for p in POLICIES)
            + " |"
        )
    return "\n".join(lines)


def readme_section(study: Study, results: StudyResults, wall_s: float, command: str) -> str:
    base = study.base
    s0, n_s = base.workload.zipf_s, study.sweep_zipf_adapters
    rows = [
        f"| {r.policy} | {r.p50_s:.1f} s | {r.p99_s:.1f} s | {r.hit_rate:.0%} | {r.loads_per_s:.2f} | "
        f"{r.store_reads_per_s:.2f} | {r.distinct_per_step:.1f} | {r.busiest_over_mean:.2f} |"
        for r in results.comparison
    ]
    table_rows = [
        f"| {n:,} | {s} | " + " | ".join(cell_text(study, results.cell(n, s, p)) for p in POLICIES) + " |"
        for n in study.table_adapters
        for s in study.table_slots
    ]
    return SECTION_TEMPLATE.format(
        command=command,
        wall=wall_s,
        describe=describe(base),
        rows="\n".join(rows),
        costs="\n".join(f"- {line}" for line in cost_lines(base.costs)),
        gie=GIE_SOURCE,
        sweep_requests=study.sweep_requests,
        slots_total=base.fleet.replicas * base.fleet.slots,
        s0=s0,
        n_s=n_s,
        rate_s=study.sweep_zipf_rate,
        read_local=base.costs.load_local_s,
        read_store=base.costs.load_store_s,
        fastest=base.workload.tokens * (base.costs.base_s(1) + base.costs.lora_s(1)),
        slowest=base.workload.tokens * (base.costs.base_s(16) + base.costs.lora_s(base.fleet.slots)),
        tokens=base.workload.tokens,
        slots=base.fleet.slots,
        per_adapter=1000 * base.costs.base_s(base.costs.lora_ref_batch) * base.costs.lora_per_adapter,
        sweep_n=markdown_sweep(
            {n: results.row_n(n) for n in sorted(study.sweep_adapters)}, "N", lambda n: hot_ratio(study, n, s0)
        ),
        sweep_s=markdown_sweep(
            {s: results.row_s(s) for s in sorted(study.sweep_zipf)}, "s", lambda s: hot_ratio(study, n_s, s)
        ),
        sweep_summary=sweep_summary(study, results),
        target=study.target_p99_s,
        table_rate=study.table_rate,
        table_requests=study.table_requests,
        ladder=", ".join(str(r) for r in study.table_replicas),
        table_rows="\n".join(table_rows),
        table_summary=table_summary(study, results),
        policies=" | ".join(POLICIES),
    )


SECTION_TEMPLATE = """### Fleet routing: simulated to 100k adapters

`{command}` ({wall:.0f} s on the 2-core development machine, one process) simulates a
fleet of Plait replicas event by event, each replica as Plait's engine is written: continuous
batching, S device slots (least recently used, pinned while a request runs), a CPU cache, one
reader thread, and requests whose adapter is not in a slot waiting for it while the others run.
Step and load costs are Plait's own CPU measurements, so the absolute latencies are those of the
2-core CPU machine; what carries over is the comparison between routing policies under the same
costs (`bench/results/fleet/results.txt`). {describe}:

| policy | p50 | p99 | slot hit rate | slot loads/s | store reads/s | adapters per step | busiest / mean |
|---|---:|---:|---:|---:|---:|---:|---:|
{rows}

- **round-robin** and **least-queued** ignore adapters; **least-queued** counts each replica's
  requests in flight exactly, as a proxy does.
- **gie**: the Kubernetes Gateway API Inference Extension's endpoint picker for a Critical
  request: queue below 128 -> replicas already running or queueing the adapter (with
  probability 0.999), else replicas with fewer active adapters than `max_lora` -> least queue
  -> least KV cache -> random, on metrics scraped every 50 ms (Plait publishes the gauges it
  reads, `vllm:lora_requests_info` included, once per engine step). As read in {gie}.
- **bounded-load**: consistent hashing of the adapter id with bounded loads (Mirrokni et al.):
  no replica takes more than ceil(1.25 x average) of the requests in flight.
- *slot hit rate*: requests whose adapter held a device slot on the chosen replica when they
  arrived; *slot loads/s*: adapters moved into a slot, whole fleet; *store reads/s*: reads a
  replica made from the object store because it had no local copy; *adapters per step*: distinct
  adapters in an engine step, averaged over steps; *busiest / mean*: requests in flight on the
  busiest replica over the mean, sampled at arrivals.

![p99 latency and slot hit rate against N and against Zipf s](bench/results/fleet/fleet.png)

Where each cost comes from (each is a flag of the script):

{costs}

There is no GPU preset: no GPU figure is in the repository yet.

With these costs a miss costs little by itself: a read takes {read_local:.2f}-{read_store:.2f} s, a request of
{tokens} tokens {fastest:.0f} s alone and {slowest:.0f} s among 16 running with {slots} adapters. What routing
changes is how many distinct adapters share an engine step (each adds {per_adapter:.0f} ms to it) and
how often a request waits for one of the S slots.

**Sweeps** ({sweep_requests:,} requests each, otherwise as above; *hot/RS*: the adapters that carry
80% of requests, over the fleet's {slots_total} slots). Over N, at s = {s0:g}:

{sweep_n}

Over the Zipf exponent s, at N = {n_s:,} and {rate_s:g} requests/s (at 5, flat popularity is past round
robin's capacity and its p99 grows with the length of the run):

{sweep_s}

{sweep_summary}

**Fewest replicas for p99 <= {target:g} s** at {table_rate:g} requests/s ({table_requests:,} requests
each; replicas searched among {ladder}; `>` means not met with the most). Latency rises
steeply just below the replica count that carries the load, and a p99 near the target moves by
a rung between seeds, so read differences of one rung as ties:

| N | S | {policies} |
|---:|---:|---:|---:|---:|---:|
{table_rows}

{table_summary}

**What a simulation cannot say.** It replays Plait's scheduler and slot cache with costs
measured on a 2-core CPU with a 135M model. The per-adapter step cost is a line fitted to
three measurements with at most 11 adapters of 6.9 MB, extrapolated to more slots; base steps
past 16 sequences are extrapolated; every request has the same prompt and output length;
prefill chunking, KV preemption, prefix caching, network delay and failures are left out; the
load figures are for 18.7 MiB adapters read from moto on loopback, not a real object store; the
GIE's later scorer-based scheduling profiles are not modelled, only its v0.3.0 decision tree. On a
GPU, where an adapter is a fraction of a percent of the base model, the per-adapter step cost
shrinks and the balance moves from slot contention towards queueing; rerun with GPU costs
(`--base-step`, `--lora-per-adapter`, `--load-store-s`) once they are measured.
"""


# --- command line -------------------------------------------------------------------------------


def parse_steps(text: str) -> tuple[tuple[int, float], ...]:
    points = []
    for item in text.split(","):
        batch, seconds = item.split(":")
        points.append((int(batch), float(seconds)))
    return tuple(sorted(points))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    c, f, w, g = Costs(), Fleet(), Workload(), RouterConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings: a smoke run of the whole study")
    p.add_argument("--compare-only", action="store_true", help="only the policy comparison, printed")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fleet")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (the default leaves a core to others)")
    p.add_argument("--seed", type=int, default=0)
    costs = p.add_argument_group("costs (seconds)")
    steps = ",".join(f"{b}:{s:.4f}" for b, s in c.base_step)
    costs.add_argument("--base-step", type=parse_steps, default=c.base_step, help=f"batch:seconds,... ({steps})")
    costs.add_argument("--lora-ref-batch", type=int, default=c.lora_ref_batch)
    costs.add_argument("--lora-fixed", type=float, default=c.lora_fixed, help="x base(ref batch), any adapter")
    costs.add_argument("--lora-per-adapter", type=float, default=c.lora_per_adapter, help="x base(ref batch) each")
    costs.add_argument("--load-local-s", type=float, default=c.load_local_s)
    costs.add_argument("--load-store-s", type=float, default=c.load_store_s)
    costs.add_argument("--slot-copy-s", type=float, default=c.slot_copy_s)
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--replicas", type=int, default=f.replicas)
    fleet.add_argument("--slots", type=int, default=f.slots)
    fleet.add_argument("--cpu-adapters", type=int, default=f.cpu_adapters)
    fleet.add_argument("--max-running", type=int, default=f.max_running)
    fleet.add_argument("--max-waiting", type=int, default=f.max_waiting)
    fleet.add_argument("--kv-tokens", type=int, default=f.kv_tokens)
    work = p.add_argument_group("workload")
    work.add_argument("--adapters", type=int, default=w.adapters)
    work.add_argument("--zipf", type=float, default=w.zipf_s)
    work.add_argument("--rate", type=float, default=w.rate, help="requests per second, whole fleet")
    work.add_argument("--requests", type=int, default=w.requests)
    work.add_argument("--warmup", type=float, default=w.warmup)
    work.add_argument("--tokens", type=int, default=w.tokens)
    work.add_argument("--prompt-tokens", type=int, default=w.prompt_tokens)
    router = p.add_argument_group("routers")
    router.add_argument("--gie-refresh-s", type=float, default=g.gie_refresh_s)
    router.add_argument("--gie-queue-threshold", type=int, default=g.gie_queue_threshold_lora)
    router.add_argument("--gie-affinity-threshold", type=float, default=g.gie_affinity_threshold)
    router.add_argument("--epsilon", type=float, default=g.epsilon)
    router.add_argument("--vnodes", type=int, default=g.vnodes)
    study = p.add_argument_group("study (the comparison uses the flags above)")
    study.add_argument("--sweep-adapters", type=int, nargs="+", default=[8, 32, 128, 1000, 10_000, 100_000])
    study.add_argument("--sweep-zipf", type=float, nargs="+", default=[0.0, 0.6, 0.8, 1.0, 1.2])
    study.add_argument("--sweep-zipf-adapters", type=int, default=100_000, help="N for the sweep over s")
    study.add_argument("--sweep-zipf-rate", type=float, default=4.5, help="requests per second for the sweep over s")
    study.add_argument("--sweep-requests", type=int, default=20_000)
    study.add_argument("--table-rate", type=float, default=20.0, help="requests per second for the R x S table")
    study.add_argument("--table-adapters", type=int, nargs="+", default=[1000, 100_000])
    study.add_argument("--table-slots", type=int, nargs="+", default=[8, 32])
    study.add_argument("--table-replicas", type=int, nargs="+", default=[16, 20, 24, 28, 32, 36, 40, 48, 64])
    study.add_argument("--table-requests", type=int, default=12_000)
    study.add_argument("--target-p99", type=float, default=20.0, help="seconds, for the R x S table")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.sweep_requests, args.table_requests = 2000, 1500, 1000
        args.sweep_adapters, args.sweep_zipf, args.table_adapters = [8, 1000, 100_000], [0.0, 1.0], [1000]
    return args


def scenario_from(args: argparse.Namespace) -> Scenario:
    return Scenario(
        costs=Costs(
            base_step=args.base_step,
            lora_ref_batch=args.lora_ref_batch,
            lora_fixed=args.lora_fixed,
            lora_per_adapter=args.lora_per_adapter,
            load_local_s=args.load_local_s,
            load_store_s=args.load_store_s,
            slot_copy_s=args.slot_copy_s,
        ),
        fleet=Fleet(
            replicas=args.replicas,
            slots=args.slots,
            cpu_adapters=args.cpu_adapters,
            max_running=args.max_running,
            max_waiting=args.max_waiting,
            kv_tokens=args.kv_tokens,
        ),
        workload=Workload(
            adapters=args.adapters,
            zipf_s=args.zipf,
            rate=args.rate,
            requests=args.requests,
            warmup=args.warmup,
            tokens=args.tokens,
            prompt_tokens=args.prompt_tokens,
        ),
        router=RouterConfig(
            gie_refresh_s=args.gie_refresh_s,
            gie_queue_threshold_lora=args.gie_queue_threshold,
            gie_affinity_threshold=args.gie_affinity_threshold,
            epsilon=args.epsilon,
            vnodes=args.vnodes,
        ),
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    scenario = scenario_from(args)
    command = " ".join(["python bench/sim_fleet.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    if args.compare_only:
        print(describe(scenario))
        print(RESULT_HEADER)
        for policy in POLICIES:
            print(fmt_result(simulate(scenario, policy)), flush=True)
        print(f"{time.perf_counter() - started:.1f} s")
        return
    study = Study(
        base=scenario,
        sweep_adapters=tuple(args.sweep_adapters),
        sweep_zipf=tuple(args.sweep_zipf),
        sweep_zipf_adapters=args.sweep_zipf_adapters,
        sweep_zipf_rate=args.sweep_zipf_rate,
        sweep_requests=args.sweep_requests,
        table_rate=args.table_rate,
        table_adapters=tuple(args.table_adapters),
        table_slots=tuple(args.table_slots),
        table_replicas=tuple(sorted(args.table_replicas)),
        table_requests=args.table_requests,
        target_p99_s=args.target_p99,
    )

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)

    results = run_study(study, args.jobs, log)
    wall = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    text = report_text(study, results, wall, command)
    (args.out / "results.txt").write_text(text)
    plot(study, results, args.out / "fleet.png")
    (args.out / "README-section.md").write_text(readme_section(study, results, wall, command))
    print(text)


if __name__ == "__main__":
    main()
