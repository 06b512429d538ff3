"""Simulator: scenario validation, workload statistics, batching, deadline queues, sweeps, plots."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from torpor.sim.report import compare, format_sweep, format_table, simulate, sweep, write_plot
from torpor.sim.scenario import ScenarioError, load_scenario, parse_scenario, parse_sweep
from torpor.sim.simulation import Simulation
from torpor.sim.workload import (
    DEFAULT_TRACE,
    counts_to_arrivals,
    make_arrivals,
    scenario_arrivals,
    synthetic_counts,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "loadtest" / "scenarios"


def small(**over):
    spec = {
        "name": "small", "gpus": 2, "gpu_memory_GB": 2, "gpus_per_node": 2,
        "node": {"pcie_GBps": 25, "nvlink": [[0, 1, 150]]},
        "models": [{"name": "a", "size_MB": 300, "exec_ms": 5, "slo_ms": 50},
                   {"name": "b", "size_MB": 900, "exec_ms": 20, "slo_ms": 150}],
        "functions": 12, "workload": {"kind": "synthetic", "duration_s": 300}, "seed": 3,
    }
    spec.update(over)
    return spec


@pytest.mark.parametrize("over, field", [
    ({"node": {"pcie_GBps": -1}}, r"scenario\.node\.pcie_GBps: bandwidth must be a positive"),
    ({"node": {"pcie_GBps": [25, -1]}}, r"scenario\.node\.pcie_GBps\[1\]: bandwidth must be a positive"),
    ({"node": {"switches": [[0, 1]], "switch_GBps": -50}}, r"node\.switch_GBps: bandwidth must be a positive"),
    ({"node": {"nvlink": [[0, 1, -150]]}}, "nvlink[0]"),
    ({"policies": ["torpor", "fifo"]}, "policies[1]"),
    ({"models": [{"name": "huge", "size_MB": 5000, "exec_ms": 5, "slo_ms": 50}]}, r"models\[0\].size_MB"),
    ({"functions": 0}, "functions"),
    ({"gpu_memory_GB": "lots"}, "gpu_memory_GB"),
    ({"weight_fraction": 1.5}, "weight_fraction"),
    # 900 MB model, 2 GB GPUs, but only 0.4 of it for weights
    ({"weight_fraction": 0.4}, r"models\[1\].size_MB: model 'b' .* larger than every GPU"),
    ({"models": [{"name": "a", "size_MB": 30, "exec_ms": 5, "slo_ms": 50, "max_batch": 0}]}, r"models\[0\].max_batch"),
    ({"models": [{"name": "a", "size_MB": 30, "exec_ms": 5, "slo_ms": 50, "batch": 4}]}, r"models\[0\]: unknown"),
    ({"copy_latency_ms": -1}, "copy_latency_ms"),
    ({"request_overhead_ms": "2"}, "request_overhead_ms"),
    ({"request_overhead_ms": 50}, r"request_overhead_ms: 50 ms leaves model 'a' \(models\[0\]\.slo_ms 50\)"),
])
def test_bad_scenario_names_field(over, field):
    with pytest.raises(ScenarioError, match=field.replace("[", r"\[").replace("]", r"\]") if "\\" not in field else field):
        parse_scenario(small(**over))


def test_platform_fields_reach_both_simulators():
    from torpor.scheduling.costmodel import TRANSFER_LATENCY_S
    from torpor.sim.paper_sim import PaperSim

    plain = parse_scenario(small())
    assert (plain.copy_latency_s, plain.request_overhead_s) == (TRANSFER_LATENCY_S, 0.0)
    assert Simulation(plain, "torpor").cost.transfer_latency_s == TRANSFER_LATENCY_S
    sc = parse_scenario(small(copy_latency_ms=2.0, request_overhead_ms=2.5))
    # the front end's share comes off every objective, once
    assert [m.slo_s for m in sc.models] == pytest.approx([0.0475, 0.1475])
    sim = Simulation(sc, "torpor")
    assert sim.cost.transfer_latency_s == sim.true_cost.transfer_latency_s == sim.xfer.latency_s == 0.002
    assert PaperSim(sc, "paper").cost.transfer_latency_s == 0.002
    # the paper scenarios carry the platform paper_eval.py reports with
    v100 = load_scenario(SCENARIOS / "paper_v100.json")
    assert (v100.copy_latency_s, v100.request_overhead_s) == (0.002, pytest.approx(0.0022))
    assert v100.models[0].slo_s == pytest.approx(0.080 - 0.0022)


def test_bad_workload_names_field():
    sc = parse_scenario(small(workload={"kind": "synthetic", "rate_scale": -2}))
    with pytest.raises(ScenarioError, match="rate_scale"):
        simulate(sc, "torpor")


def test_arrivals_follow_counts():
    rng = np.random.default_rng(0)
    counts = np.array([[30, 0], [10, 60]])
    t, fn = counts_to_arrivals(counts, rng)
    assert np.all(np.diff(t) >= 0)
    first = t < 60
    assert abs(first.sum() - 40) < 25 and abs((~first).sum() - 60) < 30
    assert not np.any(fn[~first] == 0)  # function 0 had no requests in minute 1


def test_synthetic_matches_trace_statistics():
    c = synthetic_counts(400, 31, np.random.default_rng(1))
    assert 9.0 < c.mean() < 10.6
    cv = np.mean(c.std(axis=1) / np.maximum(c.mean(axis=1), 1e-9))
    assert 0.35 < cv < 0.55  # the trace: ~0.44
    if DEFAULT_TRACE.exists():
        trace = np.load(DEFAULT_TRACE)
        assert abs(c.mean() - trace.mean()) < 1.0


@pytest.mark.skipif(not DEFAULT_TRACE.exists(), reason="trace not present beside the project")
def test_trace_arrivals_seeded():
    a = make_arrivals({"kind": "trace", "duration_s": 600}, 50, seed=7)
    b = make_arrivals({"kind": "trace", "duration_s": 600}, 50, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert 50 * 10 * 9.8 * 0.7 < len(a[0]) < 50 * 10 * 9.8 * 1.3


def test_policies_compared_on_same_arrivals(tmp_path):
    sc = parse_scenario(small(functions=16, gpus=2))
    report = compare(sc, search_gpus=4)
    by = {r["policy"]: r for r in report["results"]}
    assert set(by) == {"torpor", "lru-swap", "static"}
    assert len({r["requests"] for r in by.values()}) == 1
    # 16 functions x 600 MB average = 9.6 GB on 2 x 2 GB: static cannot hold them all
    assert by["static"]["unserved"] > 0
    assert by["torpor"]["attainment"] >= by["lru-swap"]["attainment"] - 0.01
    assert by["torpor"]["swaps"] + by["torpor"]["peer_copies"] > 0
    assert by["static"]["gpus_needed"] is None or by["static"]["gpus_needed"] >= 3
    text = format_table(report)
    assert "torpor" in text and "GPUs@99%" in text
    json.dumps(report, default=str)


def test_bundled_scenarios_load():
    for p in SCENARIOS.glob("*.json"):
        if p.name != "profiles.json":
            sc = load_scenario(p)
            assert sc.functions >= 300
    h100 = load_scenario(SCENARIOS / "h100x4.json")
    assert (h100.gpus, h100.gpu_memory, h100.links(4).bandwidth("pcie:gpu0")) == (4, 80e9, 25e9)
    assert h100.links(4).bandwidth("nvlink:gpu0>gpu3") == 150e9
    scale = load_scenario(SCENARIOS / "scale_8gpu.json")
    assert (scale.gpus, scale.functions, scale.workload["duration_s"]) == (8, 500, 3600)


def test_hundreds_of_functions():
    # speed is measured by a script (loadtest/scenarios/scale_8gpu.json), never asserted here
    sc = parse_scenario(small(functions=300, gpus=4, gpus_per_node=4, gpu_memory_GB=16,
                              node={"pcie_GBps": 25, "nvlink": [[0, 1, 150], [2, 3, 150]]},
                              workload={"kind": "synthetic", "duration_s": 600}))
    r = simulate(sc, "torpor")
    assert r.requests > 25_000  # 300 x 9.8/min x 10 min
    assert r.served == r.requests and r.swaps + r.peer_copies > 0


def one_gpu(**model):
    m = {"name": "m", "size_MB": 1, "exec_ms": 10, "slo_ms": 1000, "first_group_MB": 1}
    m.update(model)
    return parse_scenario(small(gpus=1, gpus_per_node=1, node={"pcie_GBps": 25}, models=[m], functions=1,
                                exec_noise=0, policies=["torpor"]))


def burst(times):
    return np.array(times, dtype=float), np.zeros(len(times), dtype=np.int64), 10.0


def test_no_batching_by_default():
    r = simulate(one_gpu(), "torpor", arrivals=burst([1.0] * 5))
    assert r.batches == 5 and r.mean_batch == 1.0


def test_queued_requests_of_one_model_run_as_one_batch():
    sc = one_gpu(max_batch=3, batch_scale=0.5)
    sim = Simulation(sc, "torpor")
    r = sim.run(*burst([1.0] * 5))
    # the first runs alone (the device was idle); the next three batch, the last one follows
    assert (r.batches, r.mean_batch) == (3, 5 / 3)
    lat = np.sort(sim.latency)
    swap = lat[0] - 0.010  # the first request's copy-in
    b3 = 0.010 * (1 + 0.5 * 2)
    assert lat == pytest.approx([0.010 + swap, 0.010 + swap + b3, 0.010 + swap + b3, 0.010 + swap + b3,
                                 0.010 + swap + b3 + 0.010], abs=1e-6)


def test_max_queue_delay_waits_for_a_fuller_batch():
    sc = one_gpu(max_batch=4, max_queue_delay_ms=5, batch_scale=0.5)
    sim = Simulation(sc, "torpor")
    r = sim.run(*burst([1.0, 1.001, 1.002, 1.003, 1.040]))
    # the first four make a full batch before the 5 ms delay ends; the fifth waits its own 5 ms
    assert (r.batches, r.mean_batch) == (2, 2.5)
    b4 = 0.010 * (1 + 0.5 * 3)
    assert sim.latency[0] == pytest.approx(0.003 + b4, abs=1e-6)
    assert sim.latency[4] == pytest.approx(0.005 + 0.010, abs=1e-6)


def test_predictions_hold_when_execution_is_exact():
    # With exact execution times and fixed shares (a copy's rate never changes once it moves)
    # the scheduler's estimate (queued work, including copies still landing ahead of this
    # request) is never optimistic: a request predicted to meet its SLO does.
    sc = parse_scenario(small(functions=24, exec_noise=0, workload={"kind": "synthetic", "duration_s": 300,
                                                                    "rate_scale": 3}))
    arrivals = scenario_arrivals(sc)
    slo = np.array([sc.models[f % 2].slo_s for f in arrivals[1]])
    for policy in ("torpor", "lru-swap"):
        sim = Simulation(sc, policy, link_physics="fixed")
        r = sim.run(*arrivals)
        assert r.swaps > 100 and r.actions.get("queue", 0) > 100
        assert np.isfinite(sim.predicted).all()
        if policy == "lru-swap":  # first come, first served: the estimate is exact or pessimistic
            assert np.all(sim.latency <= sim.predicted + 1e-6)
        else:
            # a deadline queue lets later, more urgent requests go first, but never past the
            # SLO margin of one already queued
            promised = sim.predicted <= 0.9 * slo
            assert promised.mean() > 0.9
            assert np.all(sim.latency[promised] <= slo[promised])


@pytest.mark.parametrize("text, param, values", [
    ("functions=300:600:100", "functions", [300, 400, 500, 600]),
    ("rate_scale=1,1.5", "rate_scale", [1.0, 1.5]),
    ({"param": "gpus", "values": [2, 4]}, "gpus", [2, 4]),
])
def test_sweep_parsing(text, param, values):
    assert parse_sweep(text) == (param, values)


@pytest.mark.parametrize("text, msg", [
    ("watts=1:2:1", "unknown parameter 'watts'"),
    ("functions=300:200:50", "START <= STOP"),
    ("functions=1.5,2", "whole numbers"),
    ("functions", "PARAM=START"),
])
def test_bad_sweep_names_field(text, msg):
    with pytest.raises(ScenarioError, match=r"scenario\.sweep: .*" + msg):
        parse_scenario(small(sweep=text))


def test_sweep_runs_every_policy_at_every_point(tmp_path):
    spec = small(functions=8, workload={"kind": "synthetic", "duration_s": 120})
    rep = sweep(spec, "functions", [8, 16], policies=["torpor", "lru-swap"])
    assert [p["sweep_value"] for p in rep["points"]] == [8, 16]
    for p in rep["points"]:
        assert [r["policy"] for r in p["results"]] == ["torpor", "lru-swap"]
        assert len({r["requests"] for r in p["results"]}) == 1  # same arrivals for both
    assert rep["points"][1]["requests"] > rep["points"][0]["requests"]
    text = format_sweep(rep)
    assert "functions" in text and "lru-swap" in text
    pytest.importorskip("matplotlib")
    for report, name in ((rep, "sweep.png"), (rep["points"][0], "one.png")):
        assert write_plot(report, tmp_path / name).startswith("wrote")
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    msg = write_plot({"target_attainment": 0.99, "results": []}, tmp_path / "x.png")
    assert "matplotlib is not installed" in msg and not (tmp_path / "x.png").exists()


def test_profile_model_larger_than_every_gpu_names_profile_and_field():
    spec = small(gpu_memory_GB=1)
    del spec["models"]
    spec["profile"] = "profiles.json#v100-paper"
    with pytest.raises(ScenarioError, match=r"scenario\.profile 'profiles.json#v100-paper': models\[7\]\.size_MB: "
                                            r"model 'bert_qa' \(1340 MB\) is larger than every GPU"):
        parse_scenario(spec, base=SCENARIOS)


def test_cli_bad_scenario_is_one_line_and_exit_2(tmp_path, capsys):
    import argparse

    from torpor.sim.report import add_arguments, run_cli

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(small(node={"pcie_GBps": 25, "nvlink": [[0, 1, -150]]})))
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run_cli(p.parse_args(["--scenario", str(bad), "--json", str(tmp_path / "out.json")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scenario.node.nvlink[0]: bandwidth must be a positive" in err
    assert not (tmp_path / "out.json").exists()


def test_cli_default_scenario_is_package_data_and_runs_without_the_trace(tmp_path, capsys, monkeypatch):
    # an installed wheel has the default scenario (torpor/sim/scenarios/) but not the trace
    # beside the project: one line says so and the synthetic generator stands in
    import argparse

    from torpor.sim import workload
    from torpor.sim.report import DEFAULT_SCENARIO, add_arguments, run_cli

    assert DEFAULT_SCENARIO.is_file() and DEFAULT_SCENARIO.parent == Path(workload.__file__).parent / "scenarios"
    monkeypatch.setattr(workload, "DEFAULT_TRACE", tmp_path / "absent.npy")
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "out.json"
    args = p.parse_args(["--duration", "60", "--functions", "40", "--search-gpus", "0", "--policy", "torpor",
                         "--json", str(out), "--plot", str(tmp_path / "out.png")])
    assert run_cli(args) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trace (torpor-trace-samples.npy" in err and "synthetic" in err
    assert json.loads(out.read_text())["workload"]["kind"] == "synthetic"


def test_gpu_search_agrees_with_exhaustive_runs(monkeypatch):
    import torpor.sim.report as sim_mod

    # attainment as a step function of the GPU count: the search must find the step from any start
    for need in (1, 2, 5, 9):
        calls = []

        def fake(sc, policy, n, *, arrivals=None, stop_below=None, need=need, calls=calls, **_):
            calls.append(n)
            return type("R", (), {"attainment": 1.0 if n >= need else 0.5})()

        monkeypatch.setattr(sim_mod, "simulate", fake)
        sc = parse_scenario(small())
        for start in (1, 2, 4, 12):
            calls.clear()
            assert sim_mod.gpus_needed(sc, "torpor", None, limit=12, start=start) == need
            assert len(calls) == len(set(calls)) <= 7
        assert sim_mod.gpus_needed(sc, "torpor", None, limit=need - 1 or 1, start=1) == (None if need > 1 else 1)


def test_batching_under_every_policy():
    models = [{"name": "a", "size_MB": 300, "exec_ms": 5, "slo_ms": 50, "max_batch": 8, "max_queue_delay_ms": 2},
              {"name": "b", "size_MB": 900, "exec_ms": 20, "slo_ms": 150, "max_batch": 4}]
    sc = parse_scenario(small(models=models, workload={"kind": "synthetic", "duration_s": 120, "zipf": 1.2,
                                                       "rate_scale": 40}))
    by = {r["policy"]: r for r in compare(sc)["results"]}
    for r in by.values():
        assert r["mean_batch"] > 1.02 and r["batches"] < r["served"]
    assert by["torpor"]["served"] == by["torpor"]["requests"]


def test_link_sharing_re_rates_copies_as_others_start_and_land():
    from torpor.scheduling.costmodel import LinkMap
    from torpor.sim.physics import LinkSharing

    lm = LinkMap.from_dict(["gpu0", "gpu1"], {"pcie_GBps": 10, "switches": [[0, 1]]})
    fair = LinkSharing(lm, 0.0)
    big, _ = fair.start(0.0, 10**9, lm.host_path("gpu0"))
    assert big.end == pytest.approx(0.1)
    small, moved = fair.start(0.05, 10**8, lm.host_path("gpu1"))  # shares the switch
    assert {id(t) for t in moved} == {id(big), id(small)}
    assert small.end == pytest.approx(0.07) and big.end == pytest.approx(0.15)
    fair.finish(small, 0.07)
    assert big.end == pytest.approx(0.11)  # 0.4 GB left at full rate after the small one
    assert fair.counts == {"pcie:gpu0": 1, "switch:sw0": 1, "pcie:gpu1": 0}
    # the fixed-share physics: a copy keeps the share it started with
    fixed = LinkSharing(lm, 0.0, shared=False)
    big, _ = fixed.start(0.0, 10**9, lm.host_path("gpu0"))
    small, moved = fixed.start(0.05, 10**8, lm.host_path("gpu1"))
    assert moved == [small] and small.end == pytest.approx(0.07) and big.end == pytest.approx(0.1)
    assert fixed.clear_at("switch:sw0") == pytest.approx(0.1) and fixed.clear_at("pcie:gpu1") == pytest.approx(0.07)
    assert fixed.clear_at("nvlink:gpu0>gpu1") == -math.inf
    # a copy that waits for its path to clear: it holds its place on the links from now (a copy
    # started meanwhile counts it), moves nothing until `begin`, then at the path's full rate
    late, moved = fixed.start(0.06, 10**9, lm.host_path("gpu0"), begin=0.1)
    assert moved == [late] and late.end == pytest.approx(0.2)
    assert fixed.counts["switch:sw0"] == 3 and fixed.clear_at("switch:sw0") == pytest.approx(0.2)
    fixed.finish(small, 0.07)
    meanwhile, _ = fixed.start(0.08, 10**8, lm.host_path("gpu1"))
    assert meanwhile.end == pytest.approx(0.08 + 0.03)  # a third of the switch (big, late and itself)
    assert late.end == pytest.approx(0.2)  # fixed shares: the later copy does not move it


def test_cli_runs_the_papers_policies_beside_ours_on_the_same_arrivals(tmp_path, capsys):
    import argparse

    from torpor.sim.paper_sim import PaperSim
    from torpor.sim.report import PAPER_POLICIES, add_arguments, paper_extras, run_cli

    path = tmp_path / "tiny.json"
    spec = small(functions=10, workload={"kind": "synthetic", "duration_s": 60})
    path.write_text(json.dumps(spec))
    # the paper's per-model numbers from <stem>.paper.csv beside the scenario, as paper_eval reads them
    (tmp_path / "tiny.paper.csv").write_text("name,native_ms,native_MB,cold_start_s\na,7,1500,2\nb,30,2000,3\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    pols = ["torpor", "lru-swap", *PAPER_POLICIES]
    argv = ["--scenario", str(path), "--search-gpus", "0", "--json", str(tmp_path / "out.json"),
            "--plot", str(tmp_path / "out.png")]
    for pol in pols:
        argv += ["--policy", pol]
    assert run_cli(p.parse_args(argv)) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out.json").read_text())
    by = {r["policy"]: r for r in report["results"]}
    assert list(by) == pols and all(pol in out for pol in pols)
    assert len({r["requests"] for r in by.values()}) == 1  # one set of arrivals for every policy
    # the same numbers as torpor.sim.paper_sim run directly on those arrivals with the sidecar's extras
    extras = paper_extras(spec, source=str(path))
    assert [e.native_s for e in extras] == [0.007, 0.030] and extras[0].cold_start_s == 2
    sc = parse_scenario(spec)
    t, fn, duration = scenario_arrivals(sc)
    for pol in ("paper", "native", "keepalive"):
        direct = PaperSim(sc, pol, extras).run(t, fn, duration)
        assert (by[pol]["attainment"], by[pol]["swaps"], by[pol]["unserved"]) == (
            direct.attainment, direct.swaps, direct.unserved)
    assert by["native"]["swaps"] == 0 and by["paper"]["swaps"] + by["paper"]["peer_copies"] > 0
    with pytest.raises(ScenarioError, match="unknown policy 'nope'"):
        compare(sc, policies=["nope"], search_gpus=0)


def test_processor_sharing_copy_that_waits_for_its_path_takes_no_share_until_it_starts():
    from torpor.scheduling.costmodel import LinkMap
    from torpor.sim.physics import LinkSharing

    lm = LinkMap.from_dict(["gpu0", "gpu1"], {"pcie_GBps": 10, "switches": [[0, 1]]})
    ps = LinkSharing(lm, 0.0)
    big, _ = ps.start(0.0, 10**9, lm.host_path("gpu0"))
    small, _ = ps.start(0.05, 10**8, lm.host_path("gpu1"))
    # at the rate it has now big lands at 0.15; once small lands (0.07) it gets it all back
    assert big.end == pytest.approx(0.15) and ps.eta(big, 0.05) == pytest.approx(0.11)
    ps.finish(small, 0.07)
    # a copy planned to start when the switch clears (0.11): until then it moves nothing and
    # slows nobody, but counts as waiting there (its bytes, when the switch clears)
    late, moved = ps.start(0.08, 10**9, lm.host_path("gpu1"), begin=0.11)
    assert moved == [late] and late.pending and late.end == pytest.approx(0.21)
    assert big.end == pytest.approx(0.11)
    ps.now = 0.08
    assert sorted(x[0] for x in ps.get("switch:sw0")) == pytest.approx([0.3e9, 1e9])
    assert ps.clear_at("switch:sw0") == pytest.approx(0.21) and ps.clear_at("nvlink:x") == -math.inf
    # a copy started meanwhile shares with big (not with the waiting one): the switch is busy
    # until 0.11 + 0.01; where starting at 0.11 would make it late, the waiting copy starts then
    mid, moved = ps.start(0.09, 10**8, lm.host_path("gpu0"), ("gpu0", object(), None))
    assert {id(t) for t in moved} == {id(big), id(mid)}
    assert ps.busy_until(late.path, 0.09) == pytest.approx(0.09 + (0.2e9 + 1e8) / 1e10)
    # would starting it now slow one of them past the deadline of a request waiting on it?
    ps.now = 0.09
    assert not ps.would_harm(late, 0.09)  # no slack known: unbounded
    ps.slack[id(mid.owner[1])] = 0.05
    assert not ps.would_harm(late, 0.09)  # 1e8 bytes left at 10 GB/s: 10 ms later, within 50 ms
    ps.slack[id(mid.owner[1])] = 0.005
    assert ps.would_harm(late, 0.09)
    assert ps.postpone(late, 0.12) == [late] and late.end == pytest.approx(0.22)
    assert mid.end == pytest.approx(0.11)
    ps.finish(mid, mid.end)
    assert big.end == pytest.approx(0.12)
    ps.finish(big, big.end)
    assert ps.busy_until(late.path, 0.12) == pytest.approx(0.12)
    moved = ps.activate(late, 0.12)
    assert moved == [late] and not late.pending and late.end == pytest.approx(0.22)
    assert ps.activate(late, 0.13) == []
    assert ps.counts == {"pcie:gpu0": 0, "switch:sw0": 1, "pcie:gpu1": 1}


def test_link_physics_from_the_environment(monkeypatch):
    # the command lines' default for --links; the simulators take it as a parameter
    from torpor.sim.physics import link_physics_from_env

    monkeypatch.delenv("TORPOR_SIM_LINKS", raising=False)
    assert link_physics_from_env() == "shared"
    monkeypatch.setenv("TORPOR_SIM_LINKS", "")
    assert link_physics_from_env() == "shared"
    monkeypatch.setenv("TORPOR_SIM_LINKS", "shared")
    assert link_physics_from_env() == "shared"
    monkeypatch.setenv("TORPOR_SIM_LINKS", "fixed")
    assert link_physics_from_env() == "fixed"
    monkeypatch.setenv("TORPOR_SIM_LINKS", "fair")
    with pytest.raises(ValueError, match="TORPOR_SIM_LINKS"):
        link_physics_from_env()
    sc = parse_scenario(small())
    with pytest.raises(ScenarioError, match="link_physics"):
        Simulation(sc, "torpor", link_physics="fair")
    # processor sharing is every simulator's default, ours and the paper's alike
    from torpor.sim.paper_sim import PaperSim

    assert Simulation(sc, "torpor").xfer.shared and PaperSim(sc, "paper").link_physics == "shared"


def test_predictions_hold_under_processor_sharing_when_execution_is_exact():
    # Under processor sharing a later copy slows the copies already on its links. Torpor's
    # scheduler counts how its copy slows the copy its request queues behind, keeps every
    # in-flight copy within the deadlines of the requests waiting on it (or waits for the
    # path), and a copy that waited does not start where it would break such a deadline: with
    # exact execution times a request predicted within its margin still meets its SLO.
    for rate in (3, 5):
        sc = parse_scenario(small(functions=24, exec_noise=0, workload={"kind": "synthetic", "duration_s": 300,
                                                                        "rate_scale": rate}))
        arrivals = scenario_arrivals(sc)
        slo = np.array([sc.models[f % 2].slo_s for f in arrivals[1]])
        sim = Simulation(sc, "torpor", link_physics="shared")
        r = sim.run(*arrivals)
        assert sim.xfer.shared and r.swaps > 1000
        promised = sim.predicted <= 0.9 * slo
        assert promised.mean() > 0.99
        assert np.all(sim.latency[promised] <= slo[promised])


# The server's admission (Staging): the rules of torpor.scheduling.admission on virtual time ----------------


def staged_gpu(models, budget_MB: float, pcie_GBps: float = 10.0, functions: int | None = None, **over):
    return parse_scenario(small(gpus=1, gpus_per_node=1, gpu_memory_GB=budget_MB / 1e3, node={"pcie_GBps": pcie_GBps},
                                models=models, functions=functions or len(models), exec_noise=0,
                                policies=["torpor"], **over))


def test_staging_is_a_scenario_field():
    from torpor.sim.scenario import Staging

    m = [{"name": "a", "size_MB": 100, "exec_ms": 10, "slo_ms": 100}]
    assert staged_gpu(m, 500).staging is None
    assert staged_gpu(m, 500, staging={}).staging == Staging(1, True)
    assert staged_gpu(m, 500, staging={"lookahead": 2, "shed": False}).staging == Staging(2, False)
    with pytest.raises(ScenarioError, match=r"scenario\.staging\.shed"):
        staged_gpu(m, 500, staging={"shed": "yes"})
    with pytest.raises(ScenarioError, match=r"scenario\.staging: unknown"):
        staged_gpu(m, 500, staging={"permits": 3})


def test_staged_copies_start_early_only_into_spare_room():
    # three functions of a 100 MB model (10 ms over 10 GB/s), 100 ms runs, all arriving at once on an
    # idle device. With room for two, the first two copies start at arrival; the third would have to
    # evict a model a staged request holds, so it starts when the first has run and given its stage
    # back. With room for all three, every copy starts at arrival (DevicePool.start_copy)
    from torpor.sim.scenario import Staging

    t, fn = np.array([0.0, 0.001, 0.002]), np.array([0, 1, 2])
    m = [{"name": "m", "size_MB": 100, "exec_ms": 100, "slo_ms": 10_000}]
    sim = Simulation(staged_gpu(m, 250, functions=3), "torpor", staging=Staging(lookahead=1))
    sim.run(t, fn, 1.0)
    issued = {rid: at for at, rid, _, _ in sim.copies}
    first_run_ends = sim.latency[0]  # its first group lands in 0.2 ms, its run takes 100 ms
    assert first_run_ends == pytest.approx(0.1002, abs=1e-4)
    assert issued[0] == 0.0 and issued[1] == 0.001
    assert issued[2] == pytest.approx(first_run_ends)
    roomy = Simulation(staged_gpu(m, 1000, functions=3), "torpor", staging=Staging(lookahead=1))
    roomy.run(t, fn, 1.0)
    assert {rid: at for at, rid, _, _ in roomy.copies} == {0: 0.0, 1: 0.001, 2: 0.002}


def test_staged_requests_ride_an_open_batch_as_the_server_batches():
    # one function, 10 ms runs, twelve requests a millisecond apart on an idle device (staging, one
    # run at a time plus one staged ahead). With dynamic batching (max batch 4) the first request
    # runs alone at once; the second is staged next, and the eight after it join its open batch
    # or the next one (device_path's _DeviceBatch) without stages of their own, each batch at most
    # 4: every request is answered, in far fewer runs than requests, none later than its batch
    from torpor.sim.scenario import Staging

    t, fn = np.arange(12) * 0.001, np.zeros(12, dtype=int)
    one = {"name": "m", "size_MB": 10, "exec_ms": 10, "slo_ms": 10_000}
    alone = Simulation(staged_gpu([one], 100), "torpor", staging=Staging(lookahead=1))
    alone.run(t, fn, 1.0)
    assert alone.devs[0].batches == 12
    batched = Simulation(staged_gpu([{**one, "max_batch": 4}], 100), "torpor", staging=Staging(lookahead=1))
    r = batched.run(t, fn, 1.0)
    d = batched.devs[0]
    assert d.batched == 12 and 4 <= d.batches <= 5 and r.unserved == 0
    assert np.isfinite(batched.latency).all()
    done = np.round(batched.latency + t, 6)
    assert max(np.unique(done, return_counts=True)[1]) <= 4  # no batch over its size
    assert batched.latency.max() < alone.latency.max() / 2


def test_staging_defers_a_copy_that_would_evict_a_model_others_wait_for():
    # room for one 100 MB model; five requests for the resident A (20 ms each), then one for B
    # whose deadline comes first: staged at once it would evict A under the four still waiting
    # (and A would come back); deferred, it waits until they have all been staged
    from torpor.sim.scenario import Staging

    sc = staged_gpu([{"name": "A", "size_MB": 100, "exec_ms": 20, "slo_ms": 5000},
                     {"name": "B", "size_MB": 100, "exec_ms": 20, "slo_ms": 500}], 150)
    t, fn = np.array([0.0, 0.0001, 0.0002, 0.0003, 0.0004, 0.001]), np.array([0, 0, 0, 0, 0, 1])
    swaps = {}
    for shed in (True, False):
        sim = Simulation(sc, "torpor", staging=Staging(1, shed))
        sim.preload([0])
        r = sim.run(t, fn, 1.0)
        assert r.served == 6 and r.shed_arrival == r.shed_queued == 0
        swaps[shed] = r.swaps
    assert swaps == {True: 1, False: 2}


def test_staging_defers_a_copy_while_requests_that_need_none_wait():
    # room for two 100 MB models (a 10 ms copy each); c1's one request runs first (its model
    # resident, the most urgent), ten 10 ms requests for the resident hot model wait, then one
    # each for c2 and c3, due before hot's. c1 is pinned while they arrive, so no copy starts
    # then. Staged in deadline order, each copy would hold the device while hot's requests wait
    # (c1, the idle victim, is no hotter than c2: that was FREE); passed over (COSTS) until
    # those have been staged, hot's first nine run back to back and c2, c3 still make their
    # objective
    from torpor.sim.scenario import Staging

    models = [{"name": "hot", "size_MB": 100, "exec_ms": 10, "slo_ms": 2000}] + [
        {"name": f"c{i}", "size_MB": 100, "exec_ms": 10, "slo_ms": 1000} for i in range(3)]
    sc = staged_gpu(models, 250)
    t = np.concatenate([[0.0], 0.0005 + np.arange(10) * 1e-4, [0.002, 0.003]])
    fn = np.array([1] + [0] * 10 + [2, 3])
    sim = Simulation(sc, "torpor", staging=Staging(1, True))
    sim.preload([0, 1])
    r = sim.run(t, fn, 3.0)
    assert r.served == 13 and r.swaps == 2
    done = sim.latency + t
    assert done[1:10].max() < 0.101  # 0.121 when the copies went first
    assert np.all(sim.latency[11:] < 0.2)


def test_staging_sheds_under_overload_and_answers_the_rest_in_time():
    # a quarter of the models' bytes, bursts at about three times what one device can run:
    # requests are shed at arrival or when their turn comes, and every other one is answered.
    # The four small models fit; requests for them always wait, so a large model's copy would
    # evict a model they want: its requests are passed over (ahead of no one, 7e71f85) until their
    # time runs out, and are then mostly shed when staged. Before 7e71f85, when they counted
    # ahead of every newcomer, more newcomers were shed at arrival and large models were copied
    # in: 1588 shed at arrival, 371 when staged, 147 copies, 38.7% attainment; now 461, 686, 8
    # and 64.2%
    from torpor.sim.scenario import Staging
    from torpor.sim.state import ANSWERED, DROPPED, SHED_ARRIVAL, SHED_QUEUED

    models = [{"name": "small", "size_MB": 18.9, "exec_ms": 2, "slo_ms": 100},
              {"name": "large", "size_MB": 69.2, "exec_ms": 5, "slo_ms": 200}]
    sc = staged_gpu(models, 88.1, pcie_GBps=4, functions=8)
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 4, 3200))  # 800 req/s against ~300 req/s of capacity
    fn = rng.choice(8, size=t.size, p=np.array([8, 1, 4, 1, 2, 1, 1, 1]) / 19)
    slo = np.array([sc.models[f % 2].slo_s for f in fn])
    sim = Simulation(sc, "torpor", staging=Staging())
    sim.preload(list(range(8)))
    r = sim.run(t, fn, 4.0, max_outstanding=200)
    st = sim.status
    answered = st == ANSWERED
    assert r.shed_arrival > 300 and r.shed_queued > 300
    assert (st == SHED_ARRIVAL).sum() == r.shed_arrival and (st == SHED_QUEUED).sum() == r.shed_queued
    assert (st == DROPPED).sum() == r.dropped
    # each shed request says why, with the server's labels (torpor_requests_shed's when:why)
    why = sim.shed_why
    assert set(why) == set(np.flatnonzero((st == SHED_ARRIVAL) | (st == SHED_QUEUED)))
    assert all(w.startswith("arrival:") == (st[rid] == SHED_ARRIVAL) for rid, w in why.items())
    assert set(why.values()) <= {"arrival:late", "arrival:harms", "queued:late", "queued:harms", "queued:stalls"}
    assert answered.sum() + r.shed_arrival + r.shed_queued + r.dropped == t.size
    assert np.isfinite(sim.latency[answered]).all() and np.isinf(sim.latency[~answered]).all()
    assert np.mean(sim.latency[answered] <= slo[answered]) > 0.9  # what is kept is served in time
    assert np.all(sim.latency[answered] <= 1.5 * slo[answered])  # and nothing waits much past it
    assert r.attainment > 0.5 and r.swaps > 0
    # the original model (copies at placement, nothing shed) answers everything, the tail many
    # seconds late: the queue only grows
    legacy = Simulation(sc, "torpor")
    legacy.preload(list(range(8)))
    lr = legacy.run(t, fn, 4.0)
    assert lr.served == t.size and lr.p99_ms > 2000


def test_planned_residents_one_per_model_from_the_first_request_that_copies_it():
    # admission.planned_residents (the placer's snapshot and the simulator's staging): the first
    # queued request of each model with a copy to make and no stage yet, landing by its run
    from types import SimpleNamespace as T

    from torpor.scheduling.admission import planned_residents

    def k(model, transfer=0.01, staged=False, estimate=0.005):
        return T(model=model, transfer=transfer, staged=staged, estimate=estimate)

    ends = [(k("a", staged=True), 0.10), (k("b", transfer=0.0), 0.11), (k("c"), 0.12), (k("c"), 0.13),
            (k("d"), 0.14), (k("e"), 0.15)]
    out = planned_residents(ends, {"d"}, lambda m: {"a": 1, "b": 2, "c": 3, "e": 5}[m], now=0.05)
    assert [(r.key, r.nbytes, r.pins, r.last_used) for r in out] == [("c", 3, 1, 0.05), ("e", 5, 1, 0.05)]
    assert [r.ready_at for r in out] == pytest.approx([0.115, 0.145])


def test_staging_a_model_a_queued_request_will_copy_in_is_seen_landing():
    # room for one 100 MB model; A resident and held by two staged requests (a run and the one
    # staged beyond it), so B's request waits for a stage with its copy not started. A second
    # request for B sees B landing by the time the first one runs and queues behind it (the
    # placer's snapshot, ad416db) instead of pricing a copy of its own; one copy is made
    from torpor.sim.scenario import Staging

    sc = staged_gpu([{"name": "A", "size_MB": 100, "exec_ms": 50, "slo_ms": 1000},
                     {"name": "B", "size_MB": 100, "exec_ms": 10, "slo_ms": 5000}], 150)
    t, fn = np.array([0.0, 0.0001, 0.001, 0.002]), np.array([0, 0, 1, 1])
    sim = Simulation(sc, "torpor", staging=Staging())
    sim.preload([0])
    r = sim.run(t, fn, 1.0)
    assert r.served == 4 and r.swaps == 1
    assert sim.action_of.tolist() == [1, 2, 3, 2]  # run, queue, swap, queue
    assert sim.predicted[3] == pytest.approx(sim.latency[3], abs=1e-3)
    # the planned resident was the decision's only: the device holds what its copies brought
    assert set(sim.devs[0].state.residents) == {1}
    assert sim.devs[0].state.free_bytes == sc.weight_budget - sc.models[1].nbytes


def test_staging_marks_a_request_passed_over_and_leaves_it_out_of_the_work_ahead(monkeypatch):
    # as the server's StagingQueue keeps Ticket.passed (7e71f85): room for one 100 MB model, A
    # resident; five requests for A (20 ms each), then one for B due first. B enters while both
    # stages are held and would be deferred at once (its copy would evict A under the requests
    # waiting for it): it is marked passed at entry, stays passed while requests for A keep
    # coming, and is unmarked when granted. Requests for A arriving meanwhile do not count B's run
    # and copy ahead of them (admission.work_ahead), and run before it: predicted as they happen
    from torpor.sim import staged
    from torpor.sim.scenario import Staging

    sc = staged_gpu([{"name": "A", "size_MB": 100, "exec_ms": 20, "slo_ms": 5000},
                     {"name": "B", "size_MB": 100, "exec_ms": 20, "slo_ms": 500}], 150)
    t = np.array([0.0, 0.0001, 0.0002, 0.0003, 0.0004, 0.001, 0.002, 0.09, 0.13])
    fn = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0])
    seen = {}  # arrival -> B's `passed` as the work ahead of that arrival was projected
    work_ahead = staged.work_ahead

    def watch(tickets, now, *args, **kw):
        for j in tickets:
            if j.rid == 5:
                seen[now] = j.passed
        return work_ahead(tickets, now, *args, **kw)

    monkeypatch.setattr(staged, "work_ahead", watch)
    sim = Simulation(sc, "torpor", staging=Staging())
    sim.preload([0])
    r = sim.run(t, fn, 1.0)
    assert r.served == 9 and r.shed_arrival == r.shed_queued == 0
    assert seen == {0.002: True, 0.09: True, 0.13: False}
    assert sim.latency[5] > sim.latency[7] + 0.09  # B ran after the requests for A that passed it
    # without the mark, B's run and copy counted ahead of them: 20 ms pessimistic
    assert sim.predicted[6:8] == pytest.approx(sim.latency[6:8], abs=1e-3)


# Links that cannot be over-committed, and prediction error (issue 18) ------------------------------------


def test_fixed_shares_a_copy_that_waited_shares_the_link_with_copies_started_meanwhile():
    from torpor.scheduling.costmodel import LinkMap
    from torpor.sim.physics import LinkSharing

    lm = LinkMap.from_dict(["gpu0", "gpu1"], {"pcie_GBps": 10, "switches": [[0, 1]]})
    fx = LinkSharing(lm, 0.0, shared=False)
    a, _ = fx.start(0.0, 10**9, lm.host_path("gpu0"))  # alone on the switch: 10 GB/s, lands at 0.1
    # a copy planned to wait for the switch to clear (0.1) and then move at its full rate
    d, moved = fx.start(0.02, 10**9, lm.host_path("gpu1"), begin=0.1)
    assert moved == [d] and d.pending and d.end == pytest.approx(0.2)
    # one started meanwhile takes its share counting the waiting copy (a, d and b on the switch)
    b, _ = fx.start(0.05, 10**9, lm.host_path("gpu0"))
    assert b.rate == pytest.approx(1e10 / 3)
    fx.finish(a, a.end)
    # at 0.1 the waiting copy takes the share a copy starting then gets (d and b on the switch),
    # not the whole link beside b: the link moves at most its bandwidth
    assert fx.activate(d, 0.1) == [d] and not d.pending and d.began == 0.1
    assert d.rate == pytest.approx(5e9) and d.end == pytest.approx(0.3)
    assert sum(t.rate for t in fx.on["switch:sw0"]) <= lm.bandwidth("switch:sw0")
    # one that finds its path clear when it starts moves at full rate
    e, _ = fx.start(0.5, 10**8, lm.host_path("gpu1"), begin=0.7)
    fx.finish(b, b.end)
    fx.finish(d, d.end)
    fx.activate(e, 0.7)
    assert e.rate == pytest.approx(1e10) and e.end == pytest.approx(0.71)


def test_fixed_shares_in_a_run_a_copy_that_waited_never_moves_faster_than_its_share(monkeypatch):
    from torpor.sim.physics import LinkSharing

    seen = []
    activate = LinkSharing.activate

    def spy(self, tr, now):
        out = activate(self, tr, now)
        if not self.shared:
            seen.append((tr.rate, min(self.links.bandwidth(lk) / len(self.on[lk]) for lk in tr.path),
                         min(self.links.bandwidth(lk) for lk in tr.path)))
        return out

    monkeypatch.setattr(LinkSharing, "activate", spy)
    sc = parse_scenario(small(functions=24, exec_noise=0, workload={"kind": "synthetic", "duration_s": 120,
                                                                    "rate_scale": 5}))
    Simulation(sc, "torpor", link_physics="fixed").run(*scenario_arrivals(sc))
    assert len(seen) > 20  # Torpor's scheduler has copies wait for their path, and they start
    assert all(rate == pytest.approx(share) for rate, share, _ in seen)
    assert any(rate < full for rate, _, full in seen)  # some found copies started meanwhile


def test_link_sharing_moves_copies_at_the_true_times_and_tells_the_scheduler_its_beliefs():
    from torpor.scheduling.costmodel import LinkMap
    from torpor.sim.physics import LinkSharing, true_links

    lm = LinkMap.from_dict(["gpu0"], {"pcie_GBps": 10})
    ps = LinkSharing(true_links(lm, 0.5), 0.0, belief=lm)  # truly half the bandwidth believed
    tr, _ = ps.start(0.0, 10**9, lm.host_path("gpu0"), scale=2.0)  # and twice the link time per byte
    # the scheduler believes 1 GB at 10 GB/s: 0.1 s; it takes 0.4 s
    assert tr.bend == pytest.approx(0.1) and tr.end == pytest.approx(0.4)
    ps.now = 0.2  # half way: the scheduler sees half its bytes left, at the bandwidth it believes
    assert ps.get("pcie:gpu0") == [(pytest.approx(0.5e9), math.inf)]
    assert ps.clear_at("pcie:gpu0") == pytest.approx(0.25) and ps.busy_until(tr.path, 0.2) == pytest.approx(0.25)
    # a second copy re-rates both: the truth at half of the true bandwidth, the belief at half the believed
    tr2, moved = ps.start(0.2, 10**9, lm.host_path("gpu0"))
    assert {id(x) for x in moved} == {id(tr), id(tr2)}
    assert tr.end == pytest.approx(0.6) and tr.bend == pytest.approx(0.3)
    assert tr2.end == pytest.approx(0.6) and tr2.bend == pytest.approx(0.4)
    assert lm.bandwidth("pcie:gpu0") == 1e10 and ps.links.bandwidth("pcie:gpu0") == 5e9


def one_model(size_MB=1000, exec_ms=10, slo_ms=1000, **over):
    # one GPU behind a 10 GB/s link, one model, no execution noise
    return parse_scenario(small(gpus=1, gpus_per_node=1, gpu_memory_GB=4, node={"pcie_GBps": 10},
                                models=[{"name": "m", "size_MB": size_MB, "exec_ms": exec_ms, "slo_ms": slo_ms}],
                                functions=1, exec_noise=0, **over))


def test_errors_change_the_true_times_not_what_the_scheduler_is_told():
    from torpor.sim.errors import Errors
    from torpor.sim.paper_sim import PaperSim

    sc = one_model()
    t, fn = np.array([0.0, 1.0]), np.array([0, 0])
    exact = Simulation(sc, "torpor")
    exact.run(t, fn, 2.0)
    # a cold copy of 1 GB at 10 GB/s: predicted and taken 0.1 s; then a 10 ms run
    assert exact.latency[0] == pytest.approx(0.1, abs=1e-3) and exact.predicted[0] == pytest.approx(0.1, abs=1e-3)
    assert exact.latency[1] == pytest.approx(0.01)
    # the link truly half as fast, every run a 3x straggler
    err = Errors(bandwidth_factor=0.5, straggler_p=1.0, straggler_x=(3.0, 3.0))
    sim = Simulation(sc, "torpor", errors=err)
    sim.run(t, fn, 2.0)
    assert sim.cost.links.bandwidth("pcie:gpu0") == 1e10 and sim.true_links.bandwidth("pcie:gpu0") == 5e9
    assert sim.predicted[0] == exact.predicted[0]  # the scheduler was told the same
    assert sim.latency[0] == pytest.approx(0.2, abs=1e-3)  # it took twice as long
    # it learned from the run it measured (30 ms; a moving estimate, 0.2 of the way) and predicts
    # its estimate, not the truth
    assert sim.predicted[1] == pytest.approx(0.01 + 0.2 * 0.02) and sim.latency[1] == pytest.approx(0.03)
    assert sim.cost.exec_seconds(0) == pytest.approx(0.014 + 0.2 * 0.016)
    # the paper's policy faces the same true times
    paper = PaperSim(sc, "paper", errors=err)
    paper.run(t, fn, 2.0)
    assert paper.latency[0] == pytest.approx(0.2, abs=1e-3) and paper.latency[1] == pytest.approx(0.03)


def test_compute_is_slowed_while_copies_move_into_its_device():
    from torpor.sim.errors import Errors
    from torpor.sim.paper_sim import PaperSim
    from torpor.sim.physics import Compute

    c = Compute(2.0)
    c.copies(0.0, 1)
    assert c.start(0.0, 0.0, 0.2) == pytest.approx(0.4)  # half speed while a copy moves in
    assert c.copies(0.1, -1) and c.end == pytest.approx(0.25)  # 0.05 done by 0.1, the rest at full speed
    assert not c.copies(0.12, 0) and c.stop() == pytest.approx(0.25)
    # a 200 ms run computing beside its own 100 ms copy: half speed until the copy lands
    sc = one_model(exec_ms=200)
    t, fn = np.array([0.0]), np.array([0])
    for sim in (Simulation(sc, "torpor", errors=Errors(copy_slowdown=2.0)),
                PaperSim(sc, "paper", errors=Errors(copy_slowdown=2.0))):
        sim.run(t, fn, 1.0)
        first = 2e6 / 1e10 + 20e-6
        assert sim.latency[0] == pytest.approx(0.1 + 20e-6 + 0.2 - (0.1 + 20e-6 - first) / 2, abs=1e-4)


def test_no_error_reproduces_the_run_without_an_error_model():
    from torpor.sim.errors import Errors
    from torpor.sim.paper_sim import PaperSim

    base = small(functions=24, workload={"kind": "synthetic", "duration_s": 120, "rate_scale": 4})
    zero = {"jitter": 0, "bandwidth_factor": 1, "exec_sigma": 0, "straggler_p": 0, "straggler_x": [3, 4],
            "copy_slowdown": 1}
    sc, sc0 = parse_scenario(base), parse_scenario({**base, "errors": zero})
    assert sc0.errors == Errors(straggler_x=(3.0, 4.0)) and sc0.errors.copies_exact and sc0.errors.exec_exact
    arrivals = scenario_arrivals(sc)
    for links in ("fixed", "shared"):
        for make in (lambda s, e=None, lk=links: Simulation(s, "torpor", link_physics=lk, errors=e),
                     lambda s, e=None, lk=links: Simulation(s, "lru-swap", link_physics=lk, errors=e),
                     lambda s, e=None, lk=links: PaperSim(s, "paper", link_physics=lk, errors=e)):
            ref = make(sc)
            r = ref.run(*arrivals)
            assert r.swaps > 50
            for other in (make(sc0), make(sc, Errors())):
                other.run(*arrivals)
                assert np.array_equal(other.latency, ref.latency)
            noisy = make(sc, Errors(jitter=0.05))  # and a small error is not
            noisy.run(*arrivals)
            assert not np.array_equal(noisy.latency, ref.latency)


def test_error_draws_are_per_request_seeded_and_independent():
    from torpor.sim.errors import Errors

    n = 200_000
    copy, run = Errors(jitter=0.5).draws(n, 7)
    assert run is None and copy.mean() == pytest.approx(1.0, abs=0.01)  # mean preserved
    assert np.array_equal(copy, Errors(jitter=0.5, exec_sigma=0.3).draws(n, 7)[0])  # one error does not move another
    assert not np.array_equal(copy, Errors(jitter=0.5).draws(n, 8)[0])
    _, run = Errors(exec_sigma=0.2, straggler_p=0.02).draws(n, 7)
    slow = run > 1.8
    assert slow.mean() == pytest.approx(0.02, abs=0.002)
    assert run[~slow].mean() == pytest.approx(1.0, abs=0.01)
    assert run[slow].min() > 1.2 and run[slow].max() < 5 * 2.5  # 2-5x times the body
    assert Errors().draws(n, 7) == (None, None) and Errors().none


def test_the_scheduler_measures_landed_copies_where_its_cost_model_can(monkeypatch):
    from torpor.sim.errors import Errors

    sc = one_model()
    sim = Simulation(sc, "torpor", errors=Errors(bandwidth_factor=0.5))
    seen = []
    sim.cost.observe_copy = lambda path, nbytes, seconds, predicted_s=None: seen.append(
        (path, nbytes, seconds, predicted_s))
    sim.run(np.array([0.0]), np.array([0]), 1.0)
    assert len(seen) == 1
    path, nbytes, seconds, predicted = seen[0]
    assert path == ("pcie:gpu0",) and nbytes == 10**9
    assert seconds == pytest.approx(0.2, abs=1e-4) and predicted == pytest.approx(0.1, abs=1e-4)
    # a cost model without it is left alone
    sim = Simulation(sc, "torpor")
    monkeypatch.delattr(type(sim.cost), "observe_copy", raising=False)
    sim.run(np.array([0.0]), np.array([0]), 1.0)


def test_errors_from_a_scenario_the_command_line_and_the_environment(tmp_path, capsys, monkeypatch):
    import argparse

    from torpor.sim.errors import Errors, merge_errors
    from torpor.sim.paper_sim import load_paper_scenario
    from torpor.sim.report import add_arguments, run_cli

    sc = parse_scenario(small(errors={"jitter": 0.1, "bandwidth_factor": 0.8, "straggler_x": [2, 4]}))
    assert sc.errors == Errors(jitter=0.1, bandwidth_factor=0.8, straggler_x=(2.0, 4.0))
    for bad, field in (({"jitter": -1}, r"errors\.jitter"), ({"bandwidth_factor": 0}, r"errors\.bandwidth_factor"),
                       ({"straggler_p": 2}, r"errors\.straggler_p"), ({"straggler_x": [5, 2]}, "straggler_x"),
                       ({"slow": 1}, "unknown field"), ({"jitter": "a"}, r"errors\.jitter")):
        with pytest.raises(ScenarioError, match=field):
            parse_scenario(small(errors=bad))
    assert merge_errors({"jitter": 0.1}, "bandwidth_factor=1.2,straggler_x=2:3")["straggler_x"] == [2.0, 3.0]
    # torpor simulate --errors, laid over the scenario's
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(small(functions=6, workload={"kind": "synthetic", "duration_s": 30},
                                     errors={"jitter": 0.1})))
    p = argparse.ArgumentParser()
    add_arguments(p)
    monkeypatch.delenv("TORPOR_SIM_ERRORS", raising=False)
    argv = ["--scenario", str(path), "--policy", "torpor", "--search-gpus", "0", "--json", str(tmp_path / "o.json"),
            "--errors", "bandwidth_factor=0.8"]
    assert run_cli(p.parse_args(argv)) == 0
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["errors"]["jitter"] == 0.1 and report["errors"]["bandwidth_factor"] == 0.8
    assert run_cli(p.parse_args([*argv[:-1], "jitter=-2"])) == 2
    assert "errors.jitter" in capsys.readouterr().err
    # the paper scenarios' loader (loadtest/paper_eval.py) takes TORPOR_SIM_ERRORS
    monkeypatch.setenv("TORPOR_SIM_ERRORS", "bandwidth_factor=1.2")
    sc, _ = load_paper_scenario(path)
    assert sc.errors == Errors(jitter=0.1, bandwidth_factor=1.2)
    monkeypatch.setenv("TORPOR_SIM_ERRORS", "jitter")
    with pytest.raises(ScenarioError, match="TORPOR_SIM_ERRORS"):
        load_paper_scenario(path)


def test_a_copy_later_than_its_plan_is_not_shown_landed():
    # as the server's placer shows it: the plan said 0.1 s, the copy truly takes 0.2 s; a
    # decision at 0.15 s sees it landing one copy latency from now, not landed
    from torpor.sim.errors import Errors

    sim = Simulation(one_model(), "torpor", errors=Errors(bandwidth_factor=0.5))
    seen = []
    place = sim.scheduler.place

    def spy(model, snap):
        seen.append({k: r.ready_at for d in snap.devices for k, r in d.residents.items()})
        return place(model, snap)

    sim.scheduler.place = spy
    sim.run(np.array([0.0, 0.15, 0.5]), np.array([0, 0, 0]), 1.0)
    assert seen[0] == {}
    assert seen[1][0] == pytest.approx(0.15 + sim.cost.transfer_latency_s)
    assert seen[2][0] == pytest.approx(0.2, abs=1e-3)  # landed: when it did
    assert sim.latency[1] == pytest.approx(0.2 + 0.01 - 0.15, abs=1e-3)  # after the first run, which waited for the copy
