"""Forward once between nodes (issue 22 item 4) on real servers: two nodes with one CPU virtual
device each (the arena holds one of the models; host links paced to 0.2 GB/s, so a swap-in takes
~20 ms and a peer where the model is hot answers sooner), each the other's peer.

The nodes run `torpor serve --peers ...`. A request a test sends with the marker header is served
where it arrives: that is how the tests put a model on the node they want without the node
forwarding it."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from .. import models
from ..conftest import Server, free_port
from .test_metrics import scrape, value

HIDDEN = 512  # ~4.2 MB per model; the 10 MiB arena holds one
MODELS = ["mlp0", "mlp1"]
MARKER = {"torpor-forwarded": "test"}
X = np.linspace(-1, 1, HIDDEN, dtype=np.float32).reshape(1, HIDDEN)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return models.write_mlps(tmp_path_factory.mktemp("forward_repo"), MODELS, 40, HIDDEN)


def cluster_node(repo, *extra: str) -> Server:
    return Server(repo, "--devices", "cpu", "--device-memory-bytes", "10MiB", "--device-bandwidths", "pcie=0.2",
                  "--default-slo-ms", "2000", *extra)


def peer_of(s: Server, grpc_url: str | None = None) -> str:
    return f"http://{s.http_url}?grpc={grpc_url or s.grpc_url}"


@pytest.fixture(scope="module")
def pair(repo, tmp_path_factory):
    """Nodes A and B, each the other's peer, reports polled every 0.2 s."""
    a, b = cluster_node(repo), cluster_node(repo)
    a.args += ["--peers", peer_of(b), "--peer-poll-interval", "0.2", "--node-name", "A"]
    b.args += ["--peers", peer_of(a), "--peer-poll-interval", "0.2", "--node-name", "B"]
    logs = tmp_path_factory.mktemp("forward_logs")
    a.start(logs)
    # a server that found a port taken comes up on fresh ones (Server.start): each node is told
    # where its peer really listens
    b.args[b.args.index("--peers") + 1] = peer_of(a)
    b.start(logs)
    if a.args[a.args.index("--peers") + 1] != peer_of(b):
        assert a.stop() == 0
        a.args[a.args.index("--peers") + 1] = peer_of(b)
        a.start(logs)
    yield a, b
    assert a.stop() == 0
    assert b.stop() == 0


def report(s: Server) -> dict:
    with urllib.request.urlopen(f"http://{s.http_url}/v2/torpor/residency", timeout=10) as r:
        return json.loads(r.read())


def forwards(s: Server, protocol: str, outcome: str) -> int:
    return sum(f["requests"] for p in report(s)["forwarding"]["peers"] for f in p["forwards"]
               if f["protocol"] == protocol and f["outcome"] == outcome)


def received(s: Server, protocol: str) -> int:
    return report(s)["forwarding"]["received"].get(protocol, 0)


def swap_ins(s: Server, model: str) -> float:
    samples, _, _ = scrape(s)
    return value(samples, "torpor_swap_ins", model=model, version="1")


def infer_http(s: Server, model: str, headers: dict | None = None, x: np.ndarray = X) -> np.ndarray:
    c = httpclient.InferenceServerClient(s.http_url)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("output", binary_data=True)
    return c.infer(model, [inp], outputs=[out], headers=headers).as_numpy("output")


def infer_grpc(s: Server, model: str, headers: dict | None = None) -> np.ndarray:
    c = grpcclient.InferenceServerClient(s.grpc_url)
    inp = grpcclient.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    try:
        return c.infer(model, [inp], headers=headers).as_numpy("output")
    finally:
        c.close()


def hot_on(s: Server, model: str) -> None:
    """`model` on `s`'s device (and, the arena holding one model, nothing else there)."""
    infer_http(s, model, MARKER)
    assert report(s)["models"][f"{model}:1"]["state"] == "device"


def wait_seen(a: Server, b: Server, timeout: float = 15.0) -> None:
    """Until `a` has read `b`'s report as it is now."""
    epoch = report(b)["epoch"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (peer,) = report(a)["forwarding"]["peers"]
        if peer["up"] and peer["epoch"] is not None and peer["epoch"] >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"{a.http_url} did not see {b.http_url}'s epoch {epoch}: {report(a)['forwarding']}")


def setup_hot_on_b(a: Server, b: Server) -> np.ndarray:
    """mlp0 hot on B only (A holds mlp1); B's answer for X."""
    hot_on(b, "mlp0")
    hot_on(a, "mlp1")
    want = infer_http(b, "mlp0", MARKER)
    wait_seen(a, b)
    return want


def test_http_request_is_answered_by_the_peer_where_the_model_is_hot(pair):
    a, b = pair
    want = setup_hot_on_b(a, b)
    before = (forwards(a, "http", "answered"), received(b, "http"), swap_ins(a, "mlp0"))
    got = infer_http(a, "mlp0")  # binary tensors: the peer's Inference-Header-Content-Length comes back
    np.testing.assert_array_equal(got, want)
    assert (forwards(a, "http", "answered"), received(b, "http")) == (before[0] + 1, before[1] + 1)
    assert swap_ins(a, "mlp0") == before[2], "forwarded: no local swap"
    assert report(a)["models"]["mlp0:1"]["state"] == "host"
    peer = report(a)["forwarding"]["peers"][0]
    assert peer["node"] == "B" and peer["overhead_s"] is not None and 0 < peer["overhead_s"] < 1
    samples, _, _ = scrape(a)
    assert value(samples, "torpor_forwards", peer=f"http://{b.http_url}", protocol="http", outcome="answered") >= 1
    assert value(samples, "torpor_peer_up", peer=f"http://{b.http_url}") == 1


def test_grpc_request_is_answered_by_the_peer_where_the_model_is_hot(pair):
    a, b = pair
    want = setup_hot_on_b(a, b)
    before = (forwards(a, "grpc", "answered"), received(b, "grpc"), swap_ins(a, "mlp0"))
    np.testing.assert_array_equal(infer_grpc(a, "mlp0"), want)
    assert (forwards(a, "grpc", "answered"), received(b, "grpc")) == (before[0] + 1, before[1] + 1)
    assert swap_ins(a, "mlp0") == before[2]


def test_the_peers_error_comes_back_unchanged(pair):
    a, b = pair
    setup_hot_on_b(a, b)
    n = forwards(a, "http", "answered")
    with pytest.raises(InferenceServerException) as e:
        infer_http(a, "mlp0", x=np.ones((1, 7), dtype=np.float32))
    assert e.value.status() == "400" and "input" in e.value.message()
    assert forwards(a, "http", "answered") == n + 1


def raw_http(s: Server, model: str, headers: dict) -> tuple[int, dict, dict]:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, HIDDEN], "datatype": "FP32",
                                   "data": X.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"http://{s.http_url}/v2/models/{model}/infer", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers), json.loads(r.read())


def test_a_marked_request_is_never_forwarded_again(pair):
    a, b = pair
    want = setup_hot_on_b(a, b)
    before = (forwards(a, "http", "answered"), received(a, "http"), swap_ins(a, "mlp0"))
    status, headers, body = raw_http(a, "mlp0", {"torpor-forwarded": "C"})
    assert status == 200 and int(headers["torpor-server-time-us"]) > 0
    np.testing.assert_array_equal(np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(1, HIDDEN), want)
    assert forwards(a, "http", "answered") == before[0], "served where it arrived"
    assert received(a, "http") == before[1] + 1
    assert swap_ins(a, "mlp0") == before[2] + 1, "A swapped it in itself"

    hot_on(a, "mlp1")
    wait_seen(a, b)
    n = forwards(a, "grpc", "answered")
    with grpc.insecure_channel(a.grpc_url) as channel:
        req = pb.ModelInferRequest(model_name="mlp0", raw_input_contents=[X.tobytes()])
        req.inputs.add(name="input", datatype="FP32", shape=[1, HIDDEN])
        resp, call = pbg.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            req, metadata=[("torpor-forwarded", "C")], timeout=30)
    got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(1, HIDDEN)
    np.testing.assert_array_equal(got, want)
    assert int(dict(call.trailing_metadata())["torpor-server-time-us"]) > 0
    assert forwards(a, "grpc", "answered") == n
    assert report(a)["models"]["mlp0:1"]["state"] == "device"


def test_a_dead_peer_costs_the_request_nothing(repo, tmp_path):
    """D polls E every 5 s (its reports trusted for 20 s), so E can go before D notices: the
    forward fails and D serves the request. First E's gRPC listener is one nobody listens on, then
    E itself is killed."""
    e = cluster_node(repo)
    d = cluster_node(repo, "--peers", peer_of(e, f"127.0.0.1:{free_port()}"), "--peer-poll-interval", "5")
    e.start(tmp_path)
    d.start(tmp_path)
    try:
        want = setup_hot_on_b(d, e)
        np.testing.assert_array_equal(infer_grpc(d, "mlp0"), want)
        assert forwards(d, "grpc", "failed") == 1
        assert report(d)["forwarding"]["peers"][0]["up"] is False, "no more forwards until E answers a poll"
        assert report(d)["models"]["mlp0:1"]["state"] == "device", "served here"

        hot_on(d, "mlp1")
        wait_seen(d, e)  # the next poll finds E again
        e.stop(signal.SIGKILL)
        np.testing.assert_array_equal(infer_http(d, "mlp0"), want)
        assert forwards(d, "http", "failed") == 1 and forwards(d, "http", "answered") == 0
        with pytest.raises(urllib.error.URLError):
            report(e)
    finally:
        e.stop()
        assert d.stop() == 0
