"""The pure parts of the residency report and forward-once (issue 22): the SLO window, a report
as a router's NodeView, the forward-once rule, the peer table, the --peers syntax."""

from __future__ import annotations

import time

import pytest
from torpor.api.forward import parse_peers

from torpor.dataplane.cluster import PeerTable
from torpor.scheduling.peers import SloWindow, hot_seconds, node_view, pick_peer

REPORT = {
    "node": "n1", "epoch": 7, "slo_attainment": 0.5,
    "devices": [
        {"name": "cuda:0", "free_bytes": 100, "queue_length": 3, "predicted_wait_s": 0.030},
        {"name": "cuda:1", "free_bytes": 50, "queue_length": 1, "predicted_wait_s": 0.010},
    ],
    "models": {
        "a:1": {"name": "a", "version": "1", "state": "host", "devices": {}},
        "a:2": {"name": "a", "version": "2", "state": "device", "devices": {"cuda:0": "resident"}, "exec_s": 0.005},
        "b:1": {"name": "b", "version": "1", "state": "loading", "devices": {"cuda:1": "landing"}, "exec_s": 0.002},
        "c:1": {"name": "c", "version": "1", "state": "device", "exec_s": 0.001,
                "devices": {"cuda:0": "resident", "cuda:1": "resident"}},
    },
}


def test_slo_window_slides_and_says_nothing_without_requests():
    w = SloWindow(10.0)
    assert w.attainment(100.0) is None
    w.add(100.0, True, 3)
    w.add(101.5, False)
    assert w.counts(102.0) == (3, 1) and w.attainment(102.0) == 0.75
    assert w.counts(110.5) == (0, 1), "the second at 100 has left a 10 s window"
    assert w.attainment(200.0) is None
    with pytest.raises(ValueError):
        SloWindow(0)


def test_node_view_of_a_report():
    v = node_view(REPORT)
    assert (v.name, v.epoch) == ("n1", 7)
    assert v.models == {"a": "device", "b": "loading", "c": "device"}, "a model's best version counts"
    assert v.predicted_wait_s == 0.010 and v.free_bytes == 150 and v.queue_len == 4
    assert v.slo_attainment == 0.5
    assert node_view(REPORT, "http://n1:8000").name == "http://n1:8000"
    empty = node_view({})
    assert (empty.models, empty.free_bytes, empty.slo_attainment) == ({}, 0, None)


def test_hot_seconds_counts_only_devices_where_the_model_has_landed():
    assert hot_seconds(REPORT, "a:2", 0.001) == pytest.approx(0.030 + 0.005 + 0.001)
    assert hot_seconds(REPORT, "c:1", 0.0) == pytest.approx(0.010 + 0.001), "the least loaded holder"
    assert hot_seconds(REPORT, "b:1", 0.0) is None, "still landing"
    assert hot_seconds(REPORT, "a:1", 0.0) is None and hot_seconds(REPORT, "zz:1", 0.0) is None


def test_pick_peer_only_where_it_beats_the_local_swap():
    assert pick_peer(0.050, [("p1", 0.040), ("p2", 0.020)]) == "p2"
    assert pick_peer(0.015, [("p1", 0.040), ("p2", 0.020)]) is None
    assert pick_peer(0.020, [("p2", 0.020)]) is None, "a tie stays here"
    assert pick_peer(float("inf"), []) is None


def test_peer_table_trusts_fresh_reports_only():
    t = PeerTable()
    t.configure("me", ["http://p:1"], stale_s=0.05)
    assert t.candidates("a:2") == []
    t.update("http://p:1", REPORT, rtt_s=0.002)
    (name, seconds), = t.candidates("a:2")
    assert name == "http://p:1" and seconds == pytest.approx(0.030 + 0.005 + 0.002)
    time.sleep(0.06)
    assert t.candidates("a:2") == [], "stale"
    t.update("http://p:1", REPORT, rtt_s=0.002)
    t.down("http://p:1", "connection refused")
    assert t.candidates("a:2") == [] and t.describe()["peers"][0]["error"] == "connection refused"


def test_overhead_is_a_median_and_counters_survive_a_new_peer_set():
    t = PeerTable()
    t.configure("me", ["http://p:1"], stale_s=2.0)
    for _ in range(5):
        t.done("http://p:1", "http", "answered", 0.004, 0.001)
    t.done("http://p:1", "grpc", "answered", 2.0, 0.001)  # one stalled forward
    t.done("http://p:1", "http", "failed", 1.0, None)  # no sample: nothing was answered
    peer = t.describe()["peers"][0]
    assert peer["overhead_s"] == pytest.approx(0.003)
    t.configure("me", ["http://p:1", "http://q:2"], stale_s=2.0)
    peers = {p["peer"]: p for p in t.describe()["peers"]}
    assert {(f["protocol"], f["outcome"]): f["requests"] for f in peers["http://p:1"]["forwards"]} == \
        {("http", "answered"): 5, ("grpc", "answered"): 1, ("http", "failed"): 1}
    assert peers["http://q:2"]["forwards"] == [] and peers["http://q:2"]["overhead_s"] is None


def test_peers_flag():
    a, b = parse_peers("http://10.0.0.2:8000, http://[::1]:8080?grpc=[::1]:9000")
    assert (a.url, a.grpc) == ("http://10.0.0.2:8000", None)
    assert (b.url, b.grpc) == ("http://[::1]:8080", "[::1]:9000")
    for bad in ("10.0.0.2:8000", "https://h:1", "http://h", "http://h:1/v2", "http://h:1?grpc=h",
                "http://h:1?x=1", " , "):
        with pytest.raises(ValueError, match="--peers"):
            parse_peers(bad)
