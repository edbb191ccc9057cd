"""bench/sim_fleet.py, the fleet simulator, at tiny scale: its policies and replicas behave as stated."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sim_fleet.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("sim_fleet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up while building it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def scenario(sim, *, replicas, slots, adapters, rate, requests=800, zipf_s=1.0, warmup=0.3, seed=0):
    return sim.Scenario(
        fleet=sim.Fleet(replicas=replicas, slots=slots),
        workload=sim.Workload(adapters=adapters, zipf_s=zipf_s, rate=rate, requests=requests, warmup=warmup),
        seed=seed,
    )


def test_costs_reproduce_the_measured_ratios(sim):
    costs = sim.Costs()
    assert costs.base_s(1) == pytest.approx(1 / 16.3)
    assert costs.base_s(16) == pytest.approx(16 / 144.3)
    assert costs.base_s(32) > costs.base_s(16)  # extrapolated, still growing
    base = costs.base_s(16)
    # bench_adapters.txt: Plait / no adapter at 16 in flight, with 1, 6 and 11 distinct adapters per batch,
    # which the costs' least-squares line meets within 0.03.
    for distinct, ratio in ((1, 0.78), (6, 0.60), (11, 0.55)):
        assert base / (base + costs.lora_s(distinct)) == pytest.approx(ratio, abs=0.03)
    assert costs.load_store_s > costs.load_local_s > 0


def test_with_one_replica_every_policy_is_the_same(sim):
    setting = scenario(sim, replicas=1, slots=4, adapters=50, rate=0.5)
    results = [sim.simulate(setting, policy) for policy in sim.POLICIES]
    assert 0.1 < results[0].hit_rate < 0.9  # misses and hits both happen, so the comparison means something
    for r in results[1:]:
        assert (r.hit_rate, r.p50_s, r.p99_s, r.loads_per_s) == (
            results[0].hit_rate,
            results[0].p50_s,
            results[0].p99_s,
            results[0].loads_per_s,
        )


def test_when_every_adapter_fits_every_request_hits_after_warmup(sim):
    one = scenario(sim, replicas=1, slots=4, adapters=4, rate=0.5, zipf_s=0.0)
    for policy in sim.POLICIES:
        result = sim.simulate(one, policy)
        assert result.hit_rate == 1.0, policy
        assert result.loads_per_s == 0.0, policy
    # With round robin every replica sees every adapter during the warm-up.
    three = scenario(sim, replicas=3, slots=4, adapters=4, rate=1.5, zipf_s=0.0)
    assert sim.simulate(three, "round-robin").hit_rate == 1.0
    # One slot fewer than adapters: now requests miss.
    assert (
        sim.simulate(scenario(sim, replicas=1, slots=3, adapters=4, rate=0.5, zipf_s=0.0), "round-robin").hit_rate < 1
    )


def test_affinity_policies_hit_more_than_round_robin_with_many_replicas_and_few_hot_adapters(sim):
    # 16 equally popular adapters, 8 replicas of 2 slots: the fleet holds them all, one replica cannot.
    setting = scenario(sim, replicas=8, slots=2, adapters=16, rate=2.0, zipf_s=0.0, requests=1500)
    hits = {policy: sim.simulate(setting, policy).hit_rate for policy in sim.POLICIES}
    assert hits["round-robin"] < 0.5
    assert hits["gie"] > hits["round-robin"] + 0.2
    assert hits["bounded-load"] > hits["round-robin"] + 0.2


def test_bounded_load_never_puts_more_than_its_bound_on_a_replica(sim):
    # One very hot adapter (s = 2): plain consistent hashing would send most requests to one replica.
    setting = scenario(sim, replicas=4, slots=4, adapters=200, rate=2.5, zipf_s=2.0, requests=1500)
    run = sim.Simulation(setting, "bounded-load")
    caps = []
    choose = run.policy.choose

    def checked(t, adapter):
        cap = run.policy.cap()
        replica = choose(t, adapter)
        assert run.replicas[replica].inflight + 1 <= cap
        caps.append(cap)
        return replica

    run.policy.choose = checked
    run.run()
    assert len(caps) == 1500
    assert run.policy.worst_excess == 0  # the bound was reached, and never passed
    assert run.policy.overflows > 0  # so some requests went on to the next replica on the ring


def test_gie_filters_as_written_in_go(sim):
    run = sim.Simulation(scenario(sim, replicas=4, slots=2, adapters=10, rate=1.0, requests=10), "gie")
    gie = run.policy
    # (waiting, KV use, active adapters) per pod
    views = [(0, 0.5, frozenset({7})), (3, 0.1, frozenset()), (1, 0.2, frozenset({1, 2})), (7, 0.0, frozenset({7}))]
    # Least queuing keeps queues within (max - min) // pods of the minimum: 7 // 4 = 1.
    assert gie.least_queuing([0, 1, 2, 3], views) == [0, 2]
    # Least KV keeps usage within (max - min) / pods of the minimum: 0.5 / 4.
    assert gie.least_kv([0, 1, 2, 3], views) == [1, 3]
    # Soft affinity: pods naming the adapter (almost always), else pods with room under max_lora = 2.
    assert gie.soft_affinity([0, 1, 2, 3], views, 7) in ([0, 3], [1])
    assert gie.soft_affinity([1, 2], views, 9) == [1]
    assert gie.soft_affinity([2], views, 9) == []  # the filter fails; the tree passes its input on
