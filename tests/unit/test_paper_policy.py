"""The paper's policies (torpor.sim.paper) pinned on small hand-built states, and a tiny run of the
paper's system (torpor.sim.paper_sim)."""

from pathlib import Path

import numpy as np
import pytest

from torpor.sim.paper import (
    ACT_IDLE,
    ACT_LOCAL,
    ACT_NVLINK,
    ACT_PCIE_HEAVY,
    ACT_PCIE_LIGHT,
    ACT_PCIE_MEDIUM,
    HEAVY,
    LIGHT,
    MEDIUM,
    FIFOQueue,
    GpuView,
    ResidentView,
    RRCQueue,
    algorithm1,
    classify,
    evict_lru,
    evict_two_list,
    random_placement,
)
from torpor.sim.paper_sim import POLICIES, PaperSim, compliance, load_paper_scenario, parse_with_extras

SCENARIOS = Path(__file__).resolve().parents[2] / "loadtest" / "scenarios"

# the paper's V100 node: switch siblings 0-1 and 2-3; fast NVLink 0-3, 1-2, 2-3; slow 0-1, 0-2, 1-3
FAST, SLOW = 45.0, 22.0
NV = {}
for a, b, bw in [(0, 3, FAST), (1, 2, FAST), (2, 3, FAST), (0, 1, SLOW), (0, 2, SLOW), (1, 3, SLOW)]:
    NV[(f"g{a}", f"g{b}")] = NV[(f"g{b}", f"g{a}")] = bw
SIB = {"g0": ["g1"], "g1": ["g0"], "g2": ["g3"], "g3": ["g2"]}


def node(idle=(0, 1, 2, 3), models=None, act=None):
    models, act = models or {}, act or {}
    return [GpuView(f"g{i}", i in idle, set(models.get(i, ())), act.get(i, ACT_IDLE if i in idle else ACT_LOCAL),
                    SIB[f"g{i}"]) for i in range(4)]


def nvlink(src, dst):
    return NV.get((src, dst))


# ---- model classes ---------------------------------------------------------------------------


def test_classes_from_table4_match_the_prototype():
    # (resident, PCIe swap) from the paper's Table 4
    assert classify(25, 27) == LIGHT  # DenseNet-169
    assert classify(14, 17) == LIGHT  # Inception-v3 (1.21x)
    assert classify(9, 13) == MEDIUM  # ResNet-50
    assert classify(17, 25) == MEDIUM  # ResNet-152
    assert classify(43, 144) == HEAVY  # Bert-qa


# ---- Algorithm 1 -------------------------------------------------------------------------------


def test_alg1_waits_when_no_gpu_idle():
    assert algorithm1("m", node(idle=()), nvlink) is None


def test_alg1_runs_on_idle_holder():
    p = algorithm1("m", node(idle=(1, 2), models={0: ["m"], 2: ["m"]}), nvlink)
    assert (p.gpu, p.action, p.branch) == ("g2", "run", "resident-idle")


def test_alg1_fastest_nvlink_from_busy_holder():
    # m only on busy g3; idle g0 (fast link to g3) and g1 (slow link to g3): copy g3 -> g0
    p = algorithm1("m", node(idle=(0, 1), models={3: ["m"]}), nvlink)
    assert (p.gpu, p.action, p.source, p.branch) == ("g0", "peer", "g3", "nvlink")
    # with only g1 idle, the slow link is the fastest there is
    p = algorithm1("m", node(idle=(1,), models={3: ["m"]}), nvlink)
    assert (p.gpu, p.source) == ("g1", "g3")
    # two holders: the fast pair wins over the slow one
    p = algorithm1("m", node(idle=(2,), models={0: ["m"], 3: ["m"]}), nvlink)
    assert (p.gpu, p.source) == ("g2", "g3")


def test_alg1_no_nvlink_path_falls_back_to_host():
    p = algorithm1("m", node(idle=(0,), models={3: ["m"]}), lambda s, d: None)
    assert (p.gpu, p.action) == ("g0", "host")


def test_alg1_host_copy_prefers_quiet_sibling():
    # g0's sibling g1 is swapping a heavy model; g2's sibling g3 runs a resident model
    gs = node(idle=(0, 2), act={1: ACT_PCIE_HEAVY, 3: ACT_LOCAL})
    p = algorithm1("m", gs, nvlink)
    assert (p.gpu, p.action, p.branch) == ("g2", "host", "host-quiet-sibling")
    # an NVLink copy on the sibling does not touch PCIe: still 'quiet'
    p = algorithm1("m", node(idle=(0, 2), act={1: ACT_PCIE_LIGHT, 3: ACT_NVLINK}), nvlink)
    assert (p.gpu, p.branch) == ("g2", "host-quiet-sibling")


def test_alg1_host_copy_prefers_lighter_sibling_swap():
    p = algorithm1("m", node(idle=(0, 2), act={1: ACT_PCIE_HEAVY, 3: ACT_PCIE_LIGHT}), nvlink)
    assert (p.gpu, p.branch) == ("g2", "host-light-sibling")
    p = algorithm1("m", node(idle=(0, 2), act={1: ACT_PCIE_MEDIUM, 3: ACT_PCIE_HEAVY}), nvlink)
    assert (p.gpu, p.branch) == ("g0", "host-any")


def test_alg1_host_copy_ties_go_to_lowest_index():
    p = algorithm1("m", node(idle=(1, 3), act={0: ACT_PCIE_MEDIUM, 2: ACT_PCIE_MEDIUM}), nvlink)
    assert (p.gpu, p.branch) == ("g1", "host-any")
    # both siblings of an idle pair are idle: g0 first
    assert algorithm1("m", node(), nvlink).gpu == "g0"


def test_random_placement_keeps_locality_else_random_host_copy():
    p = random_placement("m", node(idle=(1, 3), models={3: ["m"]}), lambda n: 0)
    assert (p.gpu, p.action) == ("g3", "run")
    p = random_placement("m", node(idle=(1, 2), models={3: ["m"]}), lambda n: 1)
    assert (p.gpu, p.action) == ("g2", "host")  # never a peer copy
    assert random_placement("m", node(idle=()), lambda n: 0) is None


# ---- eviction -----------------------------------------------------------------------------------


def r(key, mb, used, cls=LIGHT, holders=1, locked=False):
    return ResidentView(key, mb, used, cls, holders, locked)


def test_cheap_list_first_even_when_protected_is_older():
    res = [r("heavy-old", 100, 1.0, HEAVY), r("light-new", 100, 9.0, LIGHT), r("light-mid", 100, 5.0, LIGHT)]
    assert evict_two_list(res, 150) == ["light-mid", "light-new"]


def test_replicated_heavy_model_is_cheap():
    res = [r("heavy-single", 100, 1.0, HEAVY), r("heavy-replica", 100, 8.0, HEAVY, holders=2),
           r("medium-single", 100, 2.0, MEDIUM)]
    assert evict_two_list(res, 100) == ["heavy-replica"]


def test_protected_list_lru_after_cheap_exhausted():
    res = [r("light", 50, 9.0), r("medium-b", 100, 6.0, MEDIUM), r("heavy-a", 100, 3.0, HEAVY)]
    assert evict_two_list(res, 200) == ["light", "heavy-a", "medium-b"]


def test_locked_sources_are_skipped():
    res = [r("locked-light", 100, 1.0, locked=True), r("light", 100, 5.0), r("heavy", 100, 2.0, HEAVY)]
    assert evict_two_list(res, 200) == ["light", "heavy"]
    assert evict_two_list([r("a", 100, 1.0, locked=True)], 50) is None
    assert evict_two_list(res, 0) == []


def test_lru_ablation_ignores_classes():
    res = [r("heavy-old", 100, 1.0, HEAVY), r("light-new", 100, 9.0), r("locked", 100, 0.5, locked=True)]
    assert evict_lru(res, 100) == ["heavy-old"]


# ---- queues -------------------------------------------------------------------------------------


def feed(q, fn, lats, deadline=0.1):
    for x in lats:
        q.record(fn, x, deadline)


def test_rrc_values():
    q = RRCQueue(p=0.98)
    feed(q, "a", [0.05] * 49 + [0.5])  # 49 of 50 on time: RRC = (49 - 49)/0.02 = 0
    assert q.stats["a"].rrc(0.98) == pytest.approx(0.0)
    feed(q, "b", [0.2] * 10)  # 0 of 10: RRC = 9.8/0.02 = 490, E = 0.2 x 490
    assert q.stats["b"].rrc(0.98) == pytest.approx(490)
    assert q.expected("b") == pytest.approx(98)
    assert q.expected("new") == 0.0


def test_rrc_groups_and_dispatch_order():
    q = RRCQueue(p=0.98, alpha=0.5)
    feed(q, "ok", [0.01] * 10)  # E < 0: always high
    feed(q, "near", [0.05] * 9 + [0.5])  # small positive E
    feed(q, "mid", [0.05] * 8 + [0.5] * 2)
    feed(q, "far", [0.5] * 10)  # hopeless: largest E
    q.update()
    es = {f: q.expected(f) for f in ("near", "mid", "far")}
    assert es["near"] < es["mid"] < es["far"]
    total = sum(es.values())
    assert es["near"] + es["mid"] <= 0.5 * total < es["near"] + es["mid"] + es["far"]
    assert q.low == {"far"}
    for i, f in enumerate(["ok", "far", "near", "mid", "fresh"]):
        q.ready(f, float(i))
    # the high group most deficit first (a fresh function's E is 0, ok's is negative), then the
    # low group
    assert [q.pop() for _ in range(5)] == ["mid", "near", "fresh", "ok", "far"]
    assert q.pop() is None


def test_rrc_low_group_least_deficit_first():
    q = RRCQueue(p=0.98, alpha=1e-9)
    feed(q, "x", [0.5] * 10)
    feed(q, "y", [0.05] * 8 + [0.5] * 2)
    q.update()
    assert q.low == {"x", "y"}
    q.ready("x", 0.0)
    q.ready("y", 1.0)
    assert [q.pop(), q.pop()] == ["y", "x"]


def test_rrc_regroups_waiting_functions_every_interval():
    q = RRCQueue(p=0.98, alpha=1e-9, interval_s=2.0)
    q.ready("a", 0.0)  # no history yet: high
    q.ready("b", 0.5)
    feed(q, "a", [0.5] * 10)
    q.tick(1.9)
    assert q.updates == 0 and q.low == set()
    q.tick(4.0)  # updates due at 2 s and 4 s
    assert q.updates == 2 and q.low == {"a"}
    assert [q.pop(), q.pop()] == ["b", "a"]


def test_alpha_updates():
    q = RRCQueue(p=0.98, window=20, alpha=0.25)
    feed(q, "a", [0.01] * 10)
    feed(q, "b", [0.5] * 10)
    for _ in range(19):
        q.update()
    assert q.alpha == 0.25  # adapts only every 20 updates
    q.update()  # first adaptation: no reference ratio yet -> counts as a rise: doubled
    assert q.alpha == 0.5 and q.old_ratio == 0.5
    for _ in range(20):
        q.update()  # ratio unchanged: x1.01
    assert q.alpha == pytest.approx(0.505)
    feed(q, "b", [0.01] * 500)  # b becomes compliant: ratio 0.5 -> 1.0, up 100%
    for _ in range(20):
        q.update()
    assert q.alpha == pytest.approx(1.0) and q.old_ratio == 1.0  # doubled, capped at 1
    feed(q, "c", [0.5] * 10)
    feed(q, "d", [0.5] * 10)  # ratio 1.0 -> 0.5: halved
    for _ in range(20):
        q.update()
    assert q.alpha == pytest.approx(0.5) and q.old_ratio == 0.5
    feed(q, "e", [0.01] * 10)  # 0.5 -> 0.6 (+20%): doubled
    for _ in range(20):
        q.update()
    assert q.alpha == pytest.approx(1.0)
    assert [round(a, 3) for _, _, a in q.alpha_history] == [0.5, 0.505, 1.0, 0.5, 1.0]


def test_fifo_queue_oldest_head_first():
    q = FIFOQueue()
    q.ready("b", 2.0)
    q.ready("a", 1.0)
    q.ready("c", 3.0)
    assert [q.pop(), q.pop(), q.pop(), q.pop()] == ["a", "b", "c", None]


# ---- the paper's system on virtual time -----------------------------------------------------------


def tiny(functions=24, **over):
    spec = {
        "name": "tiny", "gpus": 4, "gpu_memory_GB": 1, "gpus_per_node": 4,
        "node": {"pcie_GBps": 12, "switches": [[0, 1], [2, 3]], "switch_GBps": 12,
                 "nvlink": [[0, 3, 45], [1, 2, 45], [2, 3, 45], [0, 1, 22], [0, 2, 22], [1, 3, 22]]},
        "models": [{"name": "cnn", "size_MB": 100, "exec_ms": 10, "slo_ms": 80},
                   {"name": "big", "size_MB": 600, "exec_ms": 40, "slo_ms": 200}],
        "functions": functions, "workload": {"kind": "synthetic", "duration_s": 120}, "seed": 2,
    }
    spec.update(over)
    return parse_with_extras(spec, {"cnn": {"native_MB": 400, "native_ms": 12, "cold_start_s": 5},
                                    "big": {"native_MB": 900, "native_ms": 40, "cold_start_s": 8}})


def test_every_policy_runs_on_the_same_arrivals():
    from torpor.sim.workload import scenario_arrivals

    sc, ex = tiny()
    arr = scenario_arrivals(sc)
    res = {p: PaperSim(sc, p, ex).run(*arr) for p in POLICIES}
    assert {r.requests for r in res.values()} == {len(arr[0])}
    paper = res["paper"]
    assert paper.served == paper.requests and paper.swaps > 0 and paper.peer_copies > 0
    assert paper.actions["compliant"] == paper.actions["functions"] == 24
    assert res["random"].peer_copies == 0
    # native: 4 GPUs x 1 GB; 12 x 400 MB + 12 x 900 MB do not fit: some functions are not served
    assert 0 < res["native"].actions["fit"] < 24 and res["native"].unserved > 0
    assert res["keepalive"].actions["cold_starts"] >= 1


def test_one_request_per_function_and_per_gpu():
    sc, ex = tiny(functions=2, models=[{"name": "cnn", "size_MB": 100, "exec_ms": 50, "slo_ms": 80}],
                  exec_noise=0)
    sim = PaperSim(sc, "paper", ex)
    # three requests of function 0 at once: served one after another, never in parallel
    t = np.array([0.0, 0.0, 0.0, 0.001])
    fn = np.array([0, 0, 0, 1])
    sim.run(t, fn, 1.0)
    lat0 = np.sort(sim.latency[:3])
    assert np.all(np.diff(lat0) >= 0.05 - 1e-9)
    assert sim.latency[3] < 0.06  # function 1 ran beside it on another GPU


def test_peer_copy_when_holder_busy():
    sc, ex = tiny(functions=2, models=[{"name": "cnn", "size_MB": 300, "exec_ms": 100, "slo_ms": 500}],
                  exec_noise=0)
    sim = PaperSim(sc, "paper", ex)
    # f0 swaps in on g0 and finishes; f1 swaps in on g0 too (every GPU idle: the lowest index);
    # f0 comes back while g0 runs f1: copied from g0 over the fast link to g3, not from host
    r = sim.run(np.array([0.0, 0.2, 0.25, 0.6]), np.array([0, 1, 0, 0]), 1.0)
    assert r.swaps == 2 and r.peer_copies == 1
    assert r.actions["host-quiet-sibling"] == 2 and r.actions["nvlink"] == 1
    assert r.actions["resident-idle"] == 1
    # the peer copy (300 MB at 45 GB/s, under 7 ms) overlaps the 100 ms run
    assert sim.latency[2] < 0.11


def test_compliance_rule_is_p98():
    lat = np.array([0.01] * 98 + [0.5, 0.5] + [0.01] * 10 + [np.inf])
    fn = np.array([0] * 100 + [1] * 11)
    c = compliance(lat, fn, np.array([0.08, 0.08]))
    assert c == {"compliant": 1, "functions": 2, "executed": 2}


def test_bundled_paper_scenarios_load():
    for name in ("paper_v100", "paper_h100"):
        sc, ex = load_paper_scenario(SCENARIOS / f"{name}.json")
        assert sc.gpus == 4 and len(sc.models) == 8
    sc, ex = load_paper_scenario(SCENARIOS / "paper_v100.json")
    by = {e.name: e for e in ex}
    assert by["resnet152"].native_bytes == int(1388e6) and by["bert_qa"].cls == HEAVY
    assert by["resnet50"].cls == MEDIUM and by["densenet169"].cls == LIGHT
    assert by["bert_qa"].table4_ms == {"native": 42, "resident": 43, "pcie": 144, "nvlink": 45}
