"""The simulator's multi-node mode (torpor/sim/cluster.py): nodes behind a front router that uses
torpor.scheduling.routing, against round robin and consistent hashing. Small runs (seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.unit.test_simulator import small
from torpor.scheduling.routing import DEVICE, HOST, rendezvous_owner
from torpor.sim.cluster import Cluster
from torpor.sim.scenario import ScenarioError, parse_scenario
from torpor.sim.workload import scenario_arrivals


def spec(**over):
    # test_simulator's two-model node (2 GPUs x 2 GB each), 24 functions of its 300 MB and 900 MB
    # models: 14.4 GB in all, about a node's 4 GB each when split three ways, three times that
    # when every node holds every model
    base = {"functions": 24, "models": [{"name": "a", "size_MB": 300, "exec_ms": 5, "slo_ms": 60},
                                        {"name": "b", "size_MB": 900, "exec_ms": 15, "slo_ms": 150}],
            "workload": {"kind": "synthetic", "duration_s": 120}, "seed": 5}
    return small(**{**base, **over})


@pytest.fixture(scope="module")
def runs():
    sc = parse_scenario(spec())
    t, fn, dur = scenario_arrivals(sc)
    out = {}
    for routing in ("torpor", "round-robin", "hash"):
        c = Cluster(sc, 3, routing)
        out[routing] = (c, c.run(t, fn, dur))
    return sc, fn, out


def test_torpor_keeps_each_model_on_one_node_and_uses_every_node(runs):
    _, fn, out = runs
    r = out["torpor"][1]
    assert r.requests == len(fn) and not r.stopped
    assert r.affinity >= 0.97  # nearly every request of a function on that function's one node
    assert all(share > 0.15 for share in r.node_share)  # and all three nodes serve
    rr = out["round-robin"][1]
    assert rr.affinity < 0.5 and max(rr.node_share) - min(rr.node_share) < 0.01
    # residency pays: most requests find their model on a device, where round robin copies
    assert r.hit_rate > rr.hit_rate + 0.2 and r.swaps < rr.swaps / 2
    assert r.attainment >= rr.attainment


def test_hash_sends_every_request_to_its_models_owner(runs):
    sc, fn, out = runs
    c, r = out["hash"]
    owners = [int(rendezvous_owner(str(f), c.names).split("-")[1]) for f in range(sc.functions)]
    assert np.array_equal(c.node_of, np.array(owners)[fn])
    assert r.affinity == 1.0


def test_with_no_objective_every_model_stays_at_its_owner(runs):
    # every node fits, so nothing spills: consistent hashing's placement (the Ray router routes so)
    sc, fn, out = runs
    t, fn, dur = scenario_arrivals(sc)
    c = Cluster(sc, 3, "torpor", slo_factor=math.inf)
    c.run(t, fn, dur)
    assert np.array_equal(c.node_of, out["hash"][0].node_of)


def test_each_nodes_report_is_its_simulated_state(runs):
    sc, _, out = runs
    c, _ = out["torpor"]
    now = 1e6  # after the run: every copy has landed
    for k, sim in enumerate(c.sims):
        v = c.view(k, now, epoch=7)
        resident = {f for d in sim.devs for f in d.state.residents}
        assert v.name == f"node-{k}" and v.epoch == 7
        assert {f for f in range(sc.functions) if v.models.get(str(f)) == DEVICE} == resident
        assert all(v.models[str(f)] == HOST for f in range(sc.functions) if f not in resident)
        assert v.models.get("nope") is None and len(v.models) == sc.functions
        assert v.free_bytes == sum(d.state.free_bytes for d in sim.devs)
        assert v.predicted_wait_s == 0.0 and v.queue_len == 0


def test_a_model_too_hot_for_one_node_spreads_then_returns():
    # one function: 20 requests/s (one node serves it), then 300/s (more than a node's two
    # GPUs can run at 10 ms each), then 20/s again
    sc = parse_scenario(spec(models=[{"name": "a", "size_MB": 300, "exec_ms": 10, "slo_ms": 100}], functions=1,
                             exec_noise=0))
    t = np.concatenate([np.arange(0, 10, 1 / 20), np.arange(10, 15, 1 / 300), np.arange(15, 25, 1 / 20)])
    fn = np.zeros(len(t), dtype=np.int64)
    runs = {}
    for routing in ("torpor", "hash"):
        c = Cluster(sc, 3, routing)
        runs[routing] = (c, c.run(t, fn, 25.0))
    c = runs["torpor"][0]
    calm, hot, after = t < 10, (t >= 10) & (t < 15), t >= 20
    assert len(set(c.node_of[calm])) == 1  # while one node can: one node
    assert len(set(c.node_of[hot])) >= 2  # when it cannot: more
    assert len(set(c.node_of[after])) == 1  # and back to one once the burst is over
    slo = 0.1
    met = lambda cl, mask: float(np.mean(cl.latency[mask] <= slo))
    assert met(c, hot) >= 0.99
    assert met(runs["hash"][0], hot) < 0.8  # one node alone falls behind


def test_bad_cluster_arguments():
    sc = parse_scenario(spec())
    with pytest.raises(ScenarioError, match="routing"):
        Cluster(sc, 2, "random")
    with pytest.raises(ScenarioError, match="nodes"):
        Cluster(sc, 0)


def test_a_collapsed_run_stops_early():
    sc = parse_scenario(spec(workload={"kind": "synthetic", "duration_s": 60, "rate_scale": 100}))
    t, fn, dur = scenario_arrivals(sc)
    c = Cluster(sc, 2, "round-robin")
    r = c.run(t, fn, dur, stop_below=0.9)
    assert r.stopped and r.compliant_functions < 0.99
    routed = int((c.node_of >= 0).sum())
    assert 0 < routed < len(t)  # given up before the last arrival; shares over those routed
    assert sum(r.node_share) == pytest.approx(1.0) and max(r.node_share) < 0.6
