"""The residency report (issue 22 item 2), one source on three channels: GET /v2/torpor/residency,
the torpor_* gauges on /metrics, and the router's NodeView made from it, on a real server with
one CPU virtual device whose arena holds one of the three models at a time."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient

from torpor.scheduling.peers import node_view

from .. import models
from .test_metrics import scrape, value

HIDDEN = 512  # ~4.2 MB of weights per model: 3 blocks of 2 MiB; the 10 MiB arena holds one
MODELS = ["mlp0", "mlp1", "mlp2"]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from ..conftest import Server

    repo = models.write_mlps(tmp_path_factory.mktemp("residency_repo"), MODELS, 10, HIDDEN)
    s = Server(repo, "--devices", "cpu", "--device-memory-bytes", "10MiB", "--default-slo-ms", "5000")
    s.start(tmp_path_factory.mktemp("residency_logs"))
    yield s
    assert s.stop() == 0


def report(server) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/torpor/residency", timeout=10) as r:
        return json.loads(r.read())


def infer(server, model: str) -> None:
    c = httpclient.InferenceServerClient(server.http_url)
    x = httpclient.InferInput("input", [1, HIDDEN], "FP32")
    x.set_data_from_numpy(np.ones((1, HIDDEN), dtype=np.float32))
    c.infer(model, [x])


def test_the_report_has_every_field(node):
    infer(node, "mlp0")
    r = report(node)
    assert isinstance(r["epoch"], int) and r["epoch"] > 0
    assert r["node"] == node.http_url and r["slo_window_s"] == 60.0  # named by its HTTP address (--node-name)
    (dev,) = r["devices"]
    assert dev["name"] == "cpu:0" and dev["capacity_bytes"] == 10 * 2**20
    assert dev["free_bytes"] + dev["used_bytes"] == dev["capacity_bytes"]
    assert dev["queue_length"] == 0 and dev["predicted_wait_s"] == 0.0  # idle between requests
    assert [m["model"] for m in dev["models"]] == ["mlp0:1"] and dev["models"][0]["state"] == "resident"
    assert set(r["models"]) == {"mlp0:1", "mlp1:1", "mlp2:1"}
    m = r["models"]["mlp0:1"]
    assert (m["name"], m["version"], m["state"], m["host"]) == ("mlp0", "1", "device", True)
    assert m["devices"] == {"cpu:0": "resident"} and m["bytes"] > 4_000_000 and m["exec_s"] > 0
    assert m["slo_s"] == 5.0  # --default-slo-ms: a router's slack needs it
    for other in ("mlp1:1", "mlp2:1"):
        assert r["models"][other]["state"] == "host" and r["models"][other]["devices"] == {}
    assert r["host"]["models"] == 3
    assert r["forwarding"]["peers"] == [] and r["forwarding"]["received"] == {}  # no --peers


def test_the_epoch_moves_on_swap_in_and_eviction_only(node):
    infer(node, "mlp0")
    before = report(node)
    assert report(node)["epoch"] == before["epoch"], "nothing changed: the same epoch"
    infer(node, "mlp0")  # resident: a hit changes nothing
    assert report(node)["epoch"] == before["epoch"]
    infer(node, "mlp1")  # evicts mlp0, places mlp1, its copy lands
    after = report(node)
    assert after["epoch"] >= before["epoch"] + 3
    assert after["models"]["mlp0:1"]["state"] == "host" and after["models"]["mlp1:1"]["state"] == "device"
    assert after["devices"][0]["evictions"] > before["devices"][0]["evictions"]
    infer(node, "mlp0")
    assert report(node)["epoch"] > after["epoch"]


def test_windowed_slo_attainment(node):
    for _ in range(3):
        infer(node, "mlp2")  # --default-slo-ms 5000: met, on a CPU device
    r = report(node)
    m = r["models"]["mlp2:1"]
    assert m["slo_window"]["met"] >= 3 and m["slo_window"]["missed"] == 0
    assert m["slo_attainment"] == 1.0 and r["slo_attainment"] == 1.0


def test_gauges_read_the_same_report(node):
    infer(node, "mlp1")
    r = report(node)
    samples, types, _ = scrape(node)
    assert types["torpor_residency_epoch"] == "gauge"
    assert value(samples, "torpor_residency_epoch") >= r["epoch"]
    dev = {"device": "cpu:0"}
    assert value(samples, "torpor_device_memory_capacity_bytes", **dev) == 10 * 2**20
    assert value(samples, "torpor_device_memory_free_bytes", **dev) == r["devices"][0]["free_bytes"]
    assert ("torpor_device_queue_length", frozenset(dev.items())) in samples
    assert ("torpor_device_predicted_wait_seconds", frozenset(dev.items())) in samples
    # the host store: every model's weights, none pinned on a machine without CUDA
    assert value(samples, "torpor_host_memory_bytes") == r["host"]["bytes"] > 0
    assert value(samples, "torpor_host_memory_pinned_bytes") == r["host"]["pinned_bytes"]
    assert value(samples, "torpor_model_resident", model="mlp1", version="1", device="cpu:0") == 1
    assert ("torpor_model_resident", frozenset({"model": "mlp0", "version": "1", "device": "cpu:0"}.items())) \
        not in samples
    for state, want in (("device", 1), ("loading", 0), ("host", 0)):
        assert value(samples, "torpor_model_state", model="mlp1", version="1", state=state) == want
    assert value(samples, "torpor_model_state", model="mlp0", version="1", state="host") == 1
    assert value(samples, "torpor_slo_attainment", model="mlp1", version="1") == 1.0
    assert value(samples, "torpor_slo_window_seconds") == 60
    assert value(samples, "torpor_node_slo_attainment") == 1.0
    assert types["torpor_forwarded_in"] == "counter"
    assert value(samples, "torpor_forwarded_in", protocol="http") == 0


def test_node_view_of_a_live_report(node):
    infer(node, "mlp2")
    r = report(node)
    v = node_view(r, "n1")
    assert v.name == "n1" and v.epoch == r["epoch"]
    assert v.models == {"mlp0": "host", "mlp1": "host", "mlp2": "device"}
    assert v.free_bytes == r["devices"][0]["free_bytes"] and v.queue_len == 0
    assert v.predicted_wait_s == 0.0 and v.slo_attainment == 1.0


def test_a_server_without_devices_reports_models_where_loaded(start_server, tmp_path):
    from ..conftest import make_repo

    s = start_server(make_repo(tmp_path / "repo", ["simple"]))
    r = report(s)
    assert r["devices"] == [] and "note" in r
    m = r["models"]["simple:1"]
    assert (m["state"], m["host"], m["runs_where_loaded"], m["slo_s"]) == ("host", True, True, None)
    assert r["epoch"] == report(s)["epoch"] >= 1
    assert node_view(r).models == {"simple": "host"}
