"""Scheduler on small hand-built snapshots: each action where it should be chosen."""

import pytest

from torpor.scheduling.costmodel import GB, CostModel, ExecEstimator, LinkMap
from torpor.scheduling.eviction import LRUPolicy
from torpor.scheduling.scheduler import (
    DeviceState,
    ModelInfo,
    ResidentState,
    Scheduler,
    Snapshot,
    static_assignment,
)

MB = 10**6
DEVS = ["gpu0", "gpu1", "gpu2", "gpu3"]


def cost(exec_s=0.010):
    lm = LinkMap.from_dict(DEVS, {"pcie_GBps": 25, "switches": [[0, 1], [2, 3]],
                                  "nvlink": [[0, 1, 150], [2, 3, 150]]})
    est = ExecEstimator(default_s=exec_s)
    return CostModel(lm, est, transfer_latency_s=0.0)


def devices(cap=10 * GB):
    return [DeviceState(n, cap, cap) for n in DEVS]


def put(d: DeviceState, key, nbytes, *, pins=0, last_used=0.0, ready_at=0.0):
    d.residents[key] = ResidentState(key, nbytes, ready_at=ready_at, pins=pins, last_used=last_used)
    d.free_bytes -= nbytes


def model(key="m", nbytes=500 * MB, slo=0.100):
    return ModelInfo(key, nbytes, 2 * MB, slo)


def test_run_where_resident_and_idle():
    ds = devices()
    put(ds[2], "m", 500 * MB)
    dec = Scheduler(cost()).place(model(), Snapshot(10.0, ds))
    assert (dec.device, dec.action, dec.option.source) == ("gpu2", "run", None)
    assert dec.meets_slo and dec.option.bytes_moved == 0


def test_queue_behind_work_when_it_still_meets_the_slo():
    ds = devices()
    put(ds[2], "m", 500 * MB)
    ds[2].backlog_s = 0.040  # 40 ms + 10 ms exec < 90 ms: queue, no copy
    dec = Scheduler(cost()).place(model(), Snapshot(10.0, ds))
    assert (dec.device, dec.action) == ("gpu2", "queue")
    assert dec.option.completion_s == pytest.approx(0.050)


def test_peer_copy_over_nvlink_when_queue_would_miss():
    ds = devices()
    put(ds[0], "m", 500 * MB)
    ds[0].backlog_s = 0.200  # queueing misses a 100 ms SLO
    dec = Scheduler(cost(), keep_options=True).place(model(), Snapshot(10.0, ds))
    # gpu1 has NVLink to gpu0: 500 MB at 150 GB/s ~ 3.3 ms, cheaper than a 20 ms host swap
    assert (dec.device, dec.action, dec.option.source) == ("gpu1", "peer", "gpu0")
    assert dec.meets_slo
    actions = {(o.device, o.action) for o in dec.options}
    assert ("gpu0", "queue") in actions and ("gpu2", "swap") in actions
    assert ("gpu2", "peer") not in actions  # no path gpu0 -> gpu2


def test_host_swap_when_not_resident_anywhere_and_fastest_when_none_meets_slo():
    ds = devices()
    dec = Scheduler(cost()).place(model(), Snapshot(10.0, ds))
    assert dec.action == "swap" and dec.option.source == "host"
    assert dec.option.transfer_s == pytest.approx(0.020)
    assert dec.option.completion_s == pytest.approx(0.020 + 2 * MB / (25 * GB))
    # 5 GB at 25 GB/s = 200 ms > 100 ms SLO: nothing meets it, the fastest is taken
    big = Scheduler(cost()).place(model("big", 5 * GB), Snapshot(10.0, devices()))
    assert not big.meets_slo and big.action == "swap"


def test_host_swap_avoids_busy_links():
    ds = devices()
    inflight = {"pcie:gpu0": 2, "pcie:gpu1": 2, "switch:sw0": 4}
    dec = Scheduler(cost()).place(model(), Snapshot(10.0, ds, inflight))
    assert dec.device in ("gpu2", "gpu3")  # gpu0/gpu1 get a third of their link


def test_eviction_prefers_cold_over_hot_and_skips_pinned():
    ds = devices(cap=1 * GB)
    d = ds[0]
    put(d, "hot", 300 * MB, last_used=1.0)
    put(d, "cold", 300 * MB, last_used=5.0)
    put(d, "busy", 300 * MB, pins=1)
    for o in ds[1:]:  # make every other device full of pinned models
        put(o, "p" + o.name, 1 * GB, pins=1)
    rates = {"hot": 5.0, "cold": 0.001}
    snap = Snapshot(10.0, ds, rate=lambda k: rates.get(k, 0.0))
    dec = Scheduler(cost()).place(model(nbytes=300 * MB), snap)
    assert dec.device == "gpu0" and dec.option.evict == ["cold"]
    # LRU evicts the least recently used, hot or not
    dec = Scheduler(cost(), "lru-swap").place(model(nbytes=300 * MB), snap)
    assert dec.option.evict == ["hot"]
    # nothing evictable enough anywhere: wait
    assert Scheduler(cost()).place(model(nbytes=800 * MB), snap) is None


def test_landing_copy_counts_as_resident():
    ds = devices()
    put(ds[3], "m", 500 * MB, ready_at=10.015)  # still landing for 15 ms
    dec = Scheduler(cost()).place(model(), Snapshot(10.0, ds))
    assert (dec.device, dec.action) == ("gpu3", "run")
    assert dec.option.completion_s == pytest.approx(0.025)


def test_lru_swap_baseline_least_loaded_no_peer():
    ds = devices()
    for i, d in enumerate(ds):
        d.backlog_s = 0.05 * (4 - i)
    s = Scheduler(cost(), "lru-swap")
    assert isinstance(s.eviction, LRUPolicy)
    assert s.place(model(), Snapshot(10.0, ds)).device == "gpu3"
    put(ds[0], "m", 500 * MB)
    dec = s.place(model(), Snapshot(10.0, ds))
    assert (dec.device, dec.action) == ("gpu0", "queue")  # no SLO awareness: queues at the holder


def test_static_baseline():
    placement = static_assignment([("a", 6 * GB, 1.0), ("b", 6 * GB, 0.5), ("c", 6 * GB, 0.1)],
                                  [("gpu0", 10 * GB), ("gpu1", 10 * GB)])
    assert placement == {"a": "gpu0", "b": "gpu1"}  # c fits nowhere: not served
    s = Scheduler(cost(), "static", static_map=placement)
    ds = devices()
    assert s.place(model("c"), Snapshot(0.0, ds)).option is None
    dec = s.place(model("b"), Snapshot(0.0, ds))
    assert dec.device == "gpu1" and dec.action == "swap"


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        Scheduler(cost(), "random")


def test_eviction_frees_bytes_at_least_expected_reload():
    # Room for a 1 GB model: ten warm 100 MB models or one 1 GB model used a third as often.
    # Per model the big one looks dearer to reload; per byte freed it is the cheaper to give back.
    ds = devices(cap=2 * GB)
    d = ds[0]
    for i in range(10):
        put(d, f"small{i}", 100 * MB, last_used=float(i))
    put(d, "big", 1 * GB, last_used=0.5)
    for o in ds[1:]:
        put(o, "p" + o.name, 2 * GB, pins=1)
    rates = {f"small{i}": 0.3 for i in range(10)} | {"big": 0.1}
    snap = Snapshot(10.0, ds, rate=lambda k: rates.get(k, 0.0))
    dec = Scheduler(cost()).place(model(nbytes=1 * GB), snap)
    assert dec.device == "gpu0" and dec.option.evict == ["big"]


def test_copy_goes_where_it_overlaps_queued_work():
    # A 20 ms copy on an idle device holds it ~20 ms for a 10 ms run; behind 30 ms of queued work
    # the copy lands during that work and the device spends only the run on it. Both meet the SLO.
    ds = devices()
    ds[3].backlog_s = 0.030
    dec = Scheduler(cost(), keep_options=True).place(model(), Snapshot(10.0, ds))
    assert (dec.device, dec.action) == ("gpu3", "swap") and dec.meets_slo
    idle = next(o for o in dec.options if o.device == "gpu2")
    assert idle.completion_s < dec.option.completion_s and idle.cost > dec.option.cost


def test_eviction_keeps_a_model_whose_reload_eats_most_of_its_slo():
    # On gpu0 (25 GB/s): "slow" (2.5 GB, 100 ms reload of a 135 ms margin) and "quick" (500 MB,
    # 20 ms of a 90 ms margin), "quick" the busier. Plain reload-per-byte would evict "slow"
    # (rarer); it misses whenever its copy shares the link, so "quick" goes instead.
    ds = devices(cap=3 * GB)
    put(ds[0], "slow", 2500 * MB, last_used=1.0)
    put(ds[0], "quick", 500 * MB, last_used=2.0)
    for d in ds[1:]:
        put(d, "pin" + d.name, 3 * GB, pins=1)
    rates = {"slow": 0.05, "quick": 0.2}
    snap = Snapshot(10.0, ds, rate=lambda k: rates.get(k, 0.0))
    sched = Scheduler(cost())
    sched.place(model("slow", 2500 * MB, slo=0.150), snap)  # resident: learns its objective
    sched.place(model("quick", 500 * MB, slo=0.100), snap)
    dec = sched.place(model("new", 400 * MB, slo=0.100), snap)
    assert dec.action == "swap" and dec.option.evict == ["quick"]
    # without the risk weight (or under lru-swap) the rarer, larger model goes
    flat = Scheduler(cost(), risk_power=0.0)
    flat.place(model("slow", 2500 * MB, slo=0.150), snap)
    assert flat.place(model("new", 400 * MB, slo=0.100), snap).option.evict == ["slow"]


def test_a_copy_that_would_make_a_copy_in_flight_too_late_is_avoided():
    # gpu0 is receiving a copy with 400 MB left whose request has 5 ms of slack; a new copy over
    # gpu0's switch would delay it by 400 MB / 25 GB/s = 16 ms, so the new model goes to the
    # other switch even though that costs the same
    ds = devices()
    inflight = {"pcie:gpu0": 1, "switch:sw0": 1}
    remaining = {"pcie:gpu0": [(400 * MB, 0.005)], "switch:sw0": [(400 * MB, 0.005)]}
    snap = Snapshot(10.0, ds, inflight, inflight_bytes=remaining)
    dec = Scheduler(cost(), keep_options=True).place(model(), snap)
    assert dec.device in ("gpu2", "gpu3") and dec.meets_slo
    harmful = {o.device for o in dec.options if o.harms}
    assert harmful == {"gpu0", "gpu1"}


def test_a_large_copy_waits_for_its_path_to_clear_rather_than_share_it():
    # 2.5 GB over gpu0's 25 GB/s path: 100 ms alone, 200 ms beside the copy in flight (fixed
    # shares); that copy lands in 3 ms, so waiting for it lands at 103 ms. Every GPU's path has
    # a copy in flight (each switch), so without knowing when they land every option misses.
    ds = devices()
    inflight = {"pcie:gpu0": 1, "switch:sw0": 1, "pcie:gpu2": 1, "switch:sw1": 1}
    clear = {"pcie:gpu0": 10.003, "switch:sw0": 10.003, "pcie:gpu2": 10.050, "switch:sw1": 10.050}
    big = model("big", 2500 * MB, slo=0.150)
    blind = Scheduler(cost(0.040)).place(big, Snapshot(10.0, ds, inflight))
    assert not blind.meets_slo and blind.option.start_s == 0.0
    dec = Scheduler(cost(0.040)).place(big, Snapshot(10.0, ds, inflight, link_clear=lambda lk: clear.get(lk, 0.0)))
    assert dec.meets_slo and dec.action == "swap" and dec.device in ("gpu0", "gpu1")
    assert dec.option.start_s == pytest.approx(0.003)
    assert dec.option.transfer_s == pytest.approx(0.103)
    assert dec.option.completion_s == pytest.approx(0.103 + 2 * MB / (25 * GB))
    # a small copy shares at once: 100 MB at half of 25 GB/s beats waiting 3 ms then 4 ms
    small = Scheduler(cost()).place(model("s", 100 * MB), Snapshot(10.0, ds, inflight,
                                                                   link_clear=lambda lk: clear.get(lk, 0.0)))
    assert small.option.start_s == 0.0 or small.option.transfer_s <= 0.008 + 1e-9


def test_baselines_start_every_copy_at_once():
    ds = devices()
    inflight = {lk: 1 for d in DEVS for lk in (f"pcie:{d}", "switch:sw0", "switch:sw1")}
    snap = Snapshot(10.0, ds, inflight, link_clear=lambda lk: 10.001)
    dec = Scheduler(cost(0.040), "lru-swap").place(model("big", 2500 * MB, slo=0.150), snap)
    assert dec.action == "swap" and dec.option.start_s == 0.0
    assert dec.option.transfer_s == pytest.approx(0.200)


def test_processor_sharing_a_copy_that_would_slow_one_in_flight_too_much_waits_for_its_path():
    # Every switch has a copy in flight with 100 MB left (4 ms at 25 GB/s) whose request has
    # 1 ms of slack: starting a 500 MB copy now beside it would delay it by 4 ms. Knowing when
    # each path clears, the copy waits for its path instead (the earlier copy keeps the
    # bandwidth it was promised) and then takes all of it: 4 ms + 20 ms.
    ds = devices()
    inflight = {"pcie:gpu0": 1, "switch:sw0": 1, "pcie:gpu2": 1, "switch:sw1": 1}
    remaining = {lk: [(100 * MB, 0.001)] for lk in inflight}
    clear = {"pcie:gpu0": 10.004, "switch:sw0": 10.004, "pcie:gpu2": 10.010, "switch:sw1": 10.010}
    blind = Scheduler(cost()).place(model(), Snapshot(10.0, ds, inflight, inflight_bytes=remaining))
    assert blind.option.harms and not blind.meets_slo  # every path harms, nothing meets
    dec = Scheduler(cost(), keep_options=True).place(
        model(), Snapshot(10.0, ds, inflight, inflight_bytes=remaining, link_clear=lambda lk: clear.get(lk, 0.0)))
    assert dec.meets_slo and dec.device in ("gpu0", "gpu1") and not dec.option.harms
    assert dec.option.start_s == pytest.approx(0.004)
    assert dec.option.transfer_s == pytest.approx(0.024)
    assert not any(o.harms for o in dec.options)
    # with slack to spare it may start at once and share: processor sharing lands it at 24 ms
    # too (the 100 MB copy lands first and frees its share)
    roomy = {lk: [(100 * MB, 1.0)] for lk in inflight}
    dec = Scheduler(cost()).place(model(), Snapshot(10.0, ds, inflight, inflight_bytes=roomy))
    assert dec.option.start_s == 0.0 and not dec.option.harms and dec.option.transfer_s == pytest.approx(0.024)


def test_processor_sharing_a_copy_counts_how_it_slows_the_copy_its_request_queues_behind():
    # gpu0 runs a request waiting on its own 900 MB copy, 300 MB of it left (12 ms alone); the
    # work ahead ends when that copy lands. A new 300 MB copy to gpu0 shares gpu0's link and
    # delays it by 12 ms, so the new request's completion counts the work ahead 12 ms later.
    lm = LinkMap.from_dict(["gpu0", "gpu1"], {"pcie_GBps": 25})
    c = CostModel(lm, ExecEstimator(default_s=0.005), transfer_latency_s=0.0)
    ds = [DeviceState(n, 10 * GB, 10 * GB) for n in ("gpu0", "gpu1")]
    ds[0].backlog_s = 0.012
    ds[1].backlog_s = 0.030
    remaining = {"pcie:gpu0": [(300 * MB, 1.0)]}
    snap = Snapshot(10.0, ds, {"pcie:gpu0": 1}, inflight_bytes=remaining)
    assert c.own_delay(300 * MB, ("pcie:gpu0",), "gpu0", remaining) == pytest.approx(0.012)
    assert c.own_delay(300 * MB, ("pcie:gpu1",), "gpu1", remaining) == 0.0
    opts = {o.device: o for o in Scheduler(c, keep_options=True).place(model("a", 300 * MB), snap).options}
    # gpu0: the copy lands at 24 ms (sharing), the work ahead at 12 + 12 ms, then the 5 ms run
    assert opts["gpu0"].completion_s == pytest.approx(0.024 + 0.005 + 2 * MB / (12.5 * GB), abs=1e-3)
    # gpu1's link is clear: 12 ms copy under 30 ms of work ahead
    assert opts["gpu1"].completion_s == pytest.approx(0.035)


def test_landing_estimate_where_the_owner_keeps_one():
    r = ResidentState("m", 100, ready_at=10.3)
    assert r.expected() == 10.3
    r.eta = 10.1  # processor sharing: the copies beside it land first and free their share
    assert r.expected() == 10.1
    ds = devices()
    ds[0].residents["m"] = r
    ds[0].free_bytes -= 100
    dec = Scheduler(cost()).place(model("m", 100, slo=0.5), Snapshot(10.0, ds))
    assert dec.action == "run" and dec.option.completion_s == pytest.approx(0.1 + 0.010)
