"""The scheduler in the real server: four CPU virtual devices paced to a topology file, and a
model whose execution time and size make each choice predictable.

Topology: every device's host link 0.4 GB/s; NVLink-like 4 GB/s between cpu:0-cpu:1 and
cpu:2-cpu:3 only. Model `slow`: ~16.8 MB of weights (a host swap ~42 ms, a peer copy ~4 ms), a
forward that takes 200 ms, SLO 500 ms (the scheduler plans against 0.9 of it: 450 ms).

Predicted, once the model is resident on X and its execution time known (both done by the
profile runs at load):
three concurrent requests -> the first runs on X (200 ms), the second queues behind it (400 ms,
within the SLO, and no copy is cheaper than none), the third would wait 600 ms on X, so it is
copied to another device; both a host swap (~245 ms) and a peer copy (~205 ms) meet the SLO, and
the peer copy costs less link time: it goes to X's NVLink partner and nowhere else.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as httpclient

from ..conftest import Server

DIM = 2048  # one 2048x2048 FP32 layer: 16.8 MB

SLOW_PY = '''
import time
import torch
from torch import nn


class Slow(nn.Module):
    def __init__(self, dim: int = 2048, seconds: float = 0.2):
        super().__init__()
        self.head = nn.Linear(dim, 16)
        self.body = nn.Linear(dim, dim)
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.body(x)
'''


def slow_config(name: str, slo_ms: str = "500") -> str:
    return f'''name: "{name}"
backend: "pytorch"
max_batch_size: 0
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1, {DIM} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 1, {DIM} ] }} ]
parameters {{ key: "torpor.module_class" value: {{ string_value: "slow.py:Slow" }} }}
parameters {{ key: "torpor.generate_weights" value: {{ string_value: "7" }} }}
parameters {{ key: "torpor.slo_ms" value: {{ string_value: "{slo_ms}" }} }}
'''


TOPOLOGY = {"pcie_GBps": 0.4, "nvlink": [["cpu:0", "cpu:1", 4], ["cpu:2", "cpu:3", 4]]}
PARTNER = {"cpu:0": "cpu:1", "cpu:1": "cpu:0", "cpu:2": "cpu:3", "cpu:3": "cpu:2"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("placement")
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(slow_config("slow"))
    (repo / "slow" / "slow.py").write_text(SLOW_PY)
    topo = repo.parent / "topology.json"
    topo.write_text(json.dumps(TOPOLOGY))
    srv = Server(repo, "--devices", "cpu:4", "--device-memory-bytes", "64MiB", "--topology", str(topo)).start(
        tmp_path_factory.mktemp("placement-logs"))
    yield srv
    assert srv.stop() == 0


def get(srv: Server, path: str):
    with urllib.request.urlopen(f"http://{srv.http_url}{path}", timeout=30) as r:
        return json.loads(r.read())


def infer(srv: Server) -> np.ndarray:
    x = np.ones((1, DIM), dtype=np.float32)
    with httpclient.InferenceServerClient(srv.http_url, network_timeout=60) as c:
        inp = httpclient.InferInput("x", [1, DIM], "FP32")
        inp.set_data_from_numpy(x)
        return c.infer("slow", [inp]).as_numpy("y")


def wait_for(condition, timeout: float, interval: float = 0.005) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def holders(srv: Server) -> list[str]:
    return sorted(d["name"] for d in get(srv, "/v2/torpor/residency")["devices"]
                  if any(r["model"] == "slow:1" for r in d["models"]))


def test_topology_reports_configured_links(server):
    topo = get(server, "/v2/torpor/topology")
    assert topo["policy"] == "torpor"
    links = {lk["link"]: lk for lk in topo["links"]}
    assert links["pcie:cpu:0"]["GBps"] == pytest.approx(0.4)
    assert links["pcie:cpu:0"]["measured"] is False
    assert links["nvlink:cpu:0>cpu:1"]["GBps"] == pytest.approx(4.0)
    assert "nvlink:cpu:0>cpu:2" not in links
    peers = {d["name"]: sorted(d["peers"]) for d in topo["devices"]}
    assert peers["cpu:0"] == ["cpu:1"] and peers["cpu:3"] == ["cpu:2"]


def test_placements_follow_the_cost_model(server):
    # profiled at load: swapped in from the host to one device, its execution time measured
    first = holders(server)
    assert len(first) == 1
    x = first[0]
    infer(server)
    topo = get(server, "/v2/torpor/topology")
    est = topo["exec_estimates_ms"]
    assert any(v["1"] > 150 for v in est.values()), est  # the 200 ms forward was measured
    # three at once: run, queue, and a peer copy to X's NVLink partner
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: infer(server), range(3)))
    assert all(o.shape == (1, DIM) for o in outs)
    assert holders(server) == sorted([x, PARTNER[x]])
    topo = get(server, "/v2/torpor/topology")
    decisions = topo["models"]["slow:1"]["decisions"]
    assert decisions == {"run": 2, "queue": 1, "peer": 1}, decisions
    assert topo["models"]["slow:1"]["predicted_misses"] == 0
    stats = get(server, "/v2/models/slow/stats")["model_stats"][0]
    assert stats["inference_count"] == 4
    assert sorted(m["id"] for m in stats["memory_usage"]) == sorted(int(d[-1]) for d in (x, PARTNER[x]))
    # the swap engine's own counters agree: one host swap, one peer copy
    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        metrics = r.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.splitlines() if line and not line.startswith("#")}
    assert samples['torpor_swap_ins{model="slow",version="1"}'] == 2
    assert samples['torpor_swap_peer_ins{model="slow",version="1"}'] == 1
    assert samples['torpor_scheduler_decisions{model="slow",version="1",action="peer"}'] == 1
    assert samples['torpor_slo_requests{model="slow",version="1",outcome="met"}'] == 4


def test_bad_slo_parameter_fails_the_load(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "config.pbtxt").write_text(slow_config("bad", slo_ms="fast"))
    (repo / "bad" / "slow.py").write_text(SLOW_PY)
    srv = Server(repo, "--devices", "cpu:1", "--device-memory-bytes", "64MiB", "--strict-readiness", "false", "--exit-on-error", "false").start(
        tmp_path)
    try:
        req = urllib.request.Request(f"http://{srv.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            index = {m["name"]: m for m in json.loads(r.read())}
        assert index["bad"]["state"] == "UNAVAILABLE"
        assert "torpor.slo_ms" in index["bad"]["reason"]
    finally:
        srv.stop()


def batched_config(name: str) -> str:
    return f'''name: "{name}"
backend: "pytorch"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 20000 }}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {DIM} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {DIM} ] }} ]
parameters {{ key: "torpor.module_class" value: {{ string_value: "slow.py:Slow" }} }}
parameters {{ key: "torpor.module_kwargs" value: {{ string_value: "{{\\"seconds\\": 0.1}}" }} }}
parameters {{ key: "torpor.generate_weights" value: {{ string_value: "3" }} }}
'''


def test_requests_queued_on_a_device_batch(tmp_path):
    """Six concurrent requests for a model with dynamic batching on one device: they ride in
    fewer executions than requests, each with its own rows back."""
    repo = tmp_path / "repo"
    (repo / "batched" / "1").mkdir(parents=True)
    (repo / "batched" / "config.pbtxt").write_text(batched_config("batched"))
    (repo / "batched" / "slow.py").write_text(SLOW_PY)
    srv = Server(repo, "--devices", "cpu:1", "--device-memory-bytes", "64MiB").start(tmp_path)
    try:
        def one(i: int) -> np.ndarray:
            x = np.full((1, DIM), float(i), dtype=np.float32)
            with httpclient.InferenceServerClient(srv.http_url, network_timeout=60) as c:
                inp = httpclient.InferInput("x", [1, DIM], "FP32")
                inp.set_data_from_numpy(x)
                return c.infer("batched", [inp]).as_numpy("y")

        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(one, range(1, 7)))
        ref = {i: one(i) for i in (1, 6)}  # alone, one execution each
        np.testing.assert_allclose(outs[0], ref[1], rtol=1e-4, atol=1e-5)  # batched GEMM: last bits differ
        np.testing.assert_allclose(outs[5], ref[6], rtol=1e-4, atol=1e-5)
        stats = get(srv, "/v2/models/batched/stats")["model_stats"][0]
        assert stats["inference_count"] == 8
        assert stats["execution_count"] < 8, stats
        # Triton's batch_stats: one count per execution, keyed by the rows it ran; a request that
        # joined a batch after its memory was taken has no negative input time
        batches = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
        assert sum(batches.values()) == stats["execution_count"], stats
        assert sum(size * n for size, n in batches.items()) == stats["inference_count"], stats
        for name in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert stats["inference_stats"][name]["ns"] >= 0, stats
    finally:
        assert srv.stop() == 0


def test_an_urgent_request_overtakes_queued_work(tmp_path):
    """Deadline order on a device: three 250 ms requests with a 5 s objective are queued when a
    20 ms request with a 400 ms objective arrives; it runs right after the one executing
    (first come, first served it would wait ~500 ms and miss). The test waits until the device's
    queue holds the three, so it cannot pass by the urgent request simply arriving first."""
    repo = tmp_path / "repo"
    for name, seconds, slo in (("bulk", 0.25, "5000"), ("urgent", 0.02, "400")):
        (repo / name / "1").mkdir(parents=True)
        cfg = slow_config(name, slo_ms=slo).replace(
            'parameters { key: "torpor.slo_ms"',
            f'parameters {{ key: "torpor.module_kwargs" value: {{ string_value: "{{\\"seconds\\": {seconds}}}" }} }}\n'
            'parameters { key: "torpor.slo_ms"')
        (repo / name / "config.pbtxt").write_text(cfg)
        (repo / name / "slow.py").write_text(SLOW_PY)
    srv = Server(repo, "--devices", "cpu:1", "--device-memory-bytes", "64MiB").start(tmp_path)
    try:
        def call(model: str) -> float:
            x = np.ones((1, DIM), dtype=np.float32)
            with httpclient.InferenceServerClient(srv.http_url, network_timeout=60) as c:
                inp = httpclient.InferInput("x", [1, DIM], "FP32")
                inp.set_data_from_numpy(x)
                t = time.perf_counter()
                c.infer(model, [inp])
                return time.perf_counter() - t

        with ThreadPoolExecutor(4) as pool:
            bulk = [pool.submit(call, "bulk") for _ in range(3)]
            # the three are admitted on the device (one running, two queued) before the urgent one
            # comes: seen in the scheduler's own queue, not guessed from a sleep
            queued = wait_for(lambda: sum(get(srv, "/v2/torpor/topology")["queued"].values()) == 3, timeout=10)
            assert queued, "the three bulk requests were never queued on the device together"
            urgent = pool.submit(call, "urgent").result()
            bulk_left = sum(not b.done() for b in bulk)
            [b.result() for b in bulk]
        topo = get(srv, "/v2/torpor/topology")
        assert topo["queue_order"] == "deadline"
        assert topo["models"]["urgent:1"]["slo_met"] == 1, (urgent, topo["models"])
        assert urgent < 0.4, urgent
        assert bulk_left >= 2, bulk_left  # it ran before the two that were queued ahead of it
    finally:
        assert srv.stop() == 0
