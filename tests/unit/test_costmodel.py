"""CostModel: link paths, bandwidth sharing, pipelined completion, exec estimates, SLOs."""

import pytest

from torpor.scheduling.costmodel import GB, CostModel, ExecEstimator, LinkMap, TopologyError, slo_seconds

DEVS = ["gpu0", "gpu1", "gpu2", "gpu3"]


def links():
    return LinkMap.from_dict(DEVS, {"pcie_GBps": 25, "switches": [[0, 1], [2, 3]], "switch_GBps": 50,
                                    "nvlink": [[0, 3, 150]], "p2p": [[1, 2]]})


def test_paths():
    lm = links()
    assert lm.host_path("gpu0") == ("pcie:gpu0", "switch:sw0")
    assert lm.peer_path("gpu3", "gpu0") == ("nvlink:gpu3>gpu0",)
    assert lm.peer_path("gpu1", "gpu2") == ("pcie:gpu1", "switch:sw0", "pcie:gpu2", "switch:sw1")
    assert lm.peer_path("gpu0", "gpu1") is None
    assert lm.siblings("gpu0") == ["gpu1"]
    d = lm.as_dict()
    assert {x["link"] for x in d["links"]} >= {"pcie:gpu0", "switch:sw1", "nvlink:gpu0>gpu3"}


def test_bandwidth_sharing():
    lm = links()
    path = lm.host_path("gpu0")
    assert lm.effective_bandwidth(path, {}) == 25 * GB
    # one copy already on this GPU's link: half of it
    assert lm.effective_bandwidth(path, {"pcie:gpu0": 1}) == 12.5 * GB
    # the sibling's copies share the 50 GB/s uplink: 3 in flight -> 12.5 GB/s, narrower than PCIe
    assert lm.effective_bandwidth(path, {"switch:sw0": 3}) == 12.5 * GB
    # one sibling copy: uplink 25 GB/s each, PCIe link 25: still 25
    assert lm.effective_bandwidth(path, {"switch:sw0": 1}) == 25 * GB
    cm = CostModel(lm, transfer_latency_s=0.0)
    assert cm.transfer_seconds(int(25 * GB), path, {"pcie:gpu0": 1}) == pytest.approx(2.0)
    assert cm.nominal_seconds(int(25 * GB), path) == pytest.approx(1.0)


def test_pipelined_completion():
    c = CostModel.completion
    assert c(0.0, 0.100, 0.030, 0.002) == pytest.approx(0.102)  # transfer-bound
    assert c(0.0, 0.010, 0.030, 0.002) == pytest.approx(0.032)  # compute-bound
    assert c(0.050, 0.040, 0.030, 0.002) == pytest.approx(0.080)  # copy hidden by the queue wait
    assert c(0.020, 0.100, 0.030, 0.002) == pytest.approx(0.020 + 0.080 + 0.002)


def test_exec_estimator_moving_average_and_batches():
    e = ExecEstimator(alpha=0.5, default_s=0.01)
    assert e.estimate("m") == 0.01
    e.seed("m", 0.020)
    e.observe("m", 0.040)
    assert e.estimate("m") == pytest.approx(0.030)
    assert e.estimate("m", batch=4) == pytest.approx(0.120)  # scaled from batch 1
    e.observe("m", 0.050, batch=4)
    assert e.estimate("m", batch=4) == pytest.approx(0.050)


def test_observed_swap_refines_pcie_bandwidth():
    lm = links()
    cm = CostModel(lm, transfer_latency_s=0.0)
    cm.observe_swap("gpu0", int(1 * GB), 1 / 50, source="host")  # measured 50 GB/s
    assert lm.bandwidth("pcie:gpu0") == pytest.approx(25 * GB + 0.2 * 25 * GB)
    assert lm.measured["pcie:gpu0"]


@pytest.mark.parametrize("spec, field", [
    ({"pcie_GBps": -5}, "pcie_GBps"),
    ({"nvlink": [[0, 1, 0]]}, "nvlink[0]"),
    ({"nvlink": [[0, 9, 100]]}, "nvlink[0]"),
    ({"switches": [[0, 1], [1, 2]]}, "switches[1]"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_topology_names_field(spec, field):
    with pytest.raises(TopologyError, match=field.replace("[", r"\[").replace("]", r"\]")):
        LinkMap.from_dict(DEVS, spec)


def test_slo_resolution():
    assert slo_seconds({"torpor.slo_ms": "80"}, 500) == pytest.approx(0.080)
    assert slo_seconds({}, 500) == pytest.approx(0.5)
    assert slo_seconds({}, None) is None
    assert slo_seconds({"torpor.slo_ms": "80"}, None, timeout_s=0.05) == pytest.approx(0.05)  # tightens
    assert slo_seconds({"torpor.slo_ms": "80"}, None, timeout_s=1.0) == pytest.approx(0.08)  # never loosens
    assert slo_seconds({}, None, timeout_s=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="torpor.slo_ms"):
        slo_seconds({"torpor.slo_ms": "fast"}, None)


def test_processor_sharing_estimate_from_bytes_left():
    from torpor.scheduling.costmodel import CostModel, LinkMap

    lm = LinkMap.from_dict(["gpu0", "gpu1"], {"pcie_GBps": 10, "switches": [[0, 1]]})
    cm = CostModel(lm, transfer_latency_s=0.0)
    path = lm.host_path("gpu0")
    # 1 GB behind the switch with a 200 MB copy in flight: they share until the small one lands
    # (400 MB moved in 40 ms), then the rest at full rate: (1000 + 200) MB / 10 GB/s
    assert cm.transfer_seconds(10**9, path, {"switch:sw0": 1}, {"switch:sw0": [2 * 10**8]}) == 0.12
    # a larger copy in flight shares the link to the end: 2 x 1 GB / 10 GB/s
    assert cm.transfer_seconds(10**9, path, {"switch:sw0": 1}, {"switch:sw0": [(5 * 10**9, 1.0)]}) == 0.2
    # counts only: the share at the start for the whole copy
    assert cm.transfer_seconds(10**9, path, {"switch:sw0": 1}) == 0.2
    assert list(cm.delays(10**9, path, {"switch:sw0": [(2 * 10**8, 0.01)]})) == [(0.02, 0.01)]


def test_copy_plan_waits_for_the_path_to_clear_when_that_lands_sooner():
    lm = LinkMap.from_dict(["gpu0", "gpu1"], {"pcie_GBps": 10, "switches": [[0, 1]]})
    cm = CostModel(lm, transfer_latency_s=0.0)
    path = lm.host_path("gpu0")
    busy = {"switch:sw0": 1}
    # 1.34 GB beside one copy in flight: half the switch for the whole copy (fixed shares), 268 ms
    assert cm.copy_plan(1340 * 10**6, 2 * 10**6, path, busy) == pytest.approx((0.0, 0.268, 0.0004))
    # the copy in flight lands in 5 ms: wait for it, then all 10 GB/s: 5 + 134 ms
    start, landed, first = cm.copy_plan(1340 * 10**6, 2 * 10**6, path, busy, clear_in=0.005)
    assert (start, landed, first) == pytest.approx((0.005, 0.139, 0.0052))
    # a small copy behind a long one: sharing now is sooner than waiting 100 ms
    assert cm.copy_plan(100 * 10**6, 2 * 10**6, path, busy, clear_in=0.100)[:2] == pytest.approx((0.0, 0.020))
    # a clear path, or nothing known about when it clears: start now
    assert cm.copy_plan(10**9, 0, path, {}, clear_in=0.0)[0] == 0.0
    assert cm.copy_plan(10**9, 0, path, busy, clear_in=None)[:2] == pytest.approx((0.0, 0.2))


def test_pipelined_completion_of_a_copy_that_starts_later():
    c = CostModel.completion
    # the copy starts in 5 ms, lands at 139 ms, its first group at 5.2 ms; 43 ms of compute
    assert c(0.0, 0.139, 0.043, 0.0052, 0.005) == pytest.approx(0.005 + 0.134 + 0.0002)
    # compute-bound: it cannot start before the first group lands, 5.2 ms from now
    assert c(0.0, 0.015, 0.030, 0.0052, 0.005) == pytest.approx(0.005 + 0.030 + 0.0002)
    # the device is busy past the start: the wait counts from then
    assert c(0.050, 0.139, 0.043, 0.0052, 0.005) == pytest.approx(0.005 + c(0.045, 0.134, 0.043, 0.0002))


def test_a_link_slower_than_believed_is_learned_from_copies():
    """Copies that take 1.25x their plan (the link runs at 0.8x what was configured): after the
    warm-up the estimates on that path are 1.25x, and stay there (no oscillation: each copy is
    compared with the unscaled plan); another path is untouched."""
    cm = CostModel(links())
    path, other = cm.links.host_path("gpu0"), cm.links.host_path("gpu2")
    nominal = cm.transfer_seconds(512 << 20, path, {})
    for _ in range(40):
        plan = cm.transfer_seconds(512 << 20, path, {})
        cm.observe_copy(path, 512 << 20, 1.25 * (plan / cm.copies.factor(path)), plan)
    assert cm.transfer_seconds(512 << 20, path, {}) == pytest.approx(1.25 * nominal, rel=1e-3)
    assert cm.transfer_seconds(512 << 20, other, {}) == pytest.approx(nominal)
    assert cm.copies.spread(path) == pytest.approx(0.0, abs=1e-9)


def test_exact_predictions_change_nothing_and_noise_becomes_slack():
    cm = CostModel(links())
    path = cm.links.host_path("gpu0")
    cm.exec.seed("m", 0.010)
    for _ in range(50):  # exact: ratios 1, spreads 0
        cm.observe_copy(path, 1 << 20, cm.transfer_seconds(1 << 20, path, {}), cm.transfer_seconds(1 << 20, path, {}))
        cm.observe_exec("m", 0.010)
    assert cm.copies.factor(path) == pytest.approx(1.0) and cm.risk_s(path, 0.02, "m", 0.010) == 0.0
    # runs alternating 8 and 12 ms around a 10 ms estimate: a spread of about 0.2, slack ~ 1.645 x 0.2 x 10 ms
    for i in range(200):
        cm.observe_exec("m", 0.008 if i % 2 else 0.012)
    slack = cm.risk_s(None, 0.0, "m", cm.exec_seconds("m"))
    assert 0.002 < slack < 0.005


def test_an_option_that_meets_its_objective_only_without_slack_is_not_counted_as_meeting_it():
    from torpor.scheduling.scheduler import DeviceState, ModelInfo, ResidentState, Scheduler, Snapshot

    cm = CostModel(links())
    cm.exec.seed("m", 0.010)
    sched = Scheduler(cm, "torpor")
    dev = DeviceState("gpu0", 1 << 30, 1 << 29, {"m": ResidentState("m", 1 << 20, ready_at=0.0)}, 0.0, 0)
    snap = Snapshot(1.0, [dev, *(DeviceState(d, 1 << 30, 1 << 29, {}, 0.0, 0) for d in DEVS[1:])], {})
    info = ModelInfo("m", 1 << 20, 1 << 20, slo_s=0.012)  # 10 ms run, 12 ms x 0.9 = 10.8 ms limit
    assert sched.place(info, snap).meets_slo
    for i in range(200):  # runs that vary by +-40%: the calibrated 95th percentile is past the limit
        cm.observe_exec("m", 0.006 if i % 2 else 0.014)
    d = sched.place(info, snap)
    assert d.option.device == "gpu0" and not d.meets_slo
