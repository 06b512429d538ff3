"""Faults and limits: a model that raises, hangs, answers with the wrong shape or type, holds
memory while failing, or fails to load or reload; a full queue, the request `timeout`, clients that
go away, oversized tensors and messages. Each request fails cleanly in the protocol's shape, the
others proceed, and the statistics count the failures. (SIGTERM draining: test_shutdown.py.)"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ..conftest import Server, make_repo, pending_requests
from ..fault_models import CODE, write_fault_models


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    repo = write_fault_models(make_repo(tmp_path_factory.mktemp("fault_repo"), ["simple"]))
    s = Server(repo, "--model-control-mode", "explicit", "--load-model", "*", "--exit-on-error", "false", "--max-tensor-elements", "1000",
               "--grpc-max-message-size", "65536").start(tmp_path_factory.mktemp("fault_logs"))
    s.repo = repo
    yield s
    s.stop()


def _inputs(mod, value: int, shape=(1,)):
    i = mod.InferInput("INPUT0", list(shape), "INT32")
    i.set_data_from_numpy(np.full(shape, value, dtype=np.int32))
    return [i]


def _fails(server: Server, model: str) -> int:
    c = httpclient.InferenceServerClient(server.http_url)
    return c.get_inference_statistics(model)["model_stats"][0]["inference_stats"]["fail"]["count"]


def _good_still_answers(server: Server) -> None:
    h = httpclient.InferenceServerClient(server.http_url)
    assert int(h.infer("good", _inputs(httpclient, 21)).as_numpy("OUTPUT0")[0]) == 42
    g = grpcclient.InferenceServerClient(server.grpc_url)
    assert int(g.infer("good", _inputs(grpcclient, 5)).as_numpy("OUTPUT0")[0]) == 10


@pytest.mark.parametrize("model,fragment", [
    ("raises", "this model raises"),
    ("wrong_shape", "with shape [3], but its config expects [1]"),
    ("wrong_dtype", "ValueError"),
    ("no_output", "did not produce output 'OUTPUT0'"),
])
def test_misbehaving_model_fails_cleanly(faulty, model, fragment):
    before = _fails(faulty, model)
    h = httpclient.InferenceServerClient(faulty.http_url)
    # the output is asked for by name: a model may leave out outputs nobody asked for, as in Triton
    with pytest.raises(InferenceServerException) as e:
        h.infer(model, _inputs(httpclient, 1), outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    assert e.value.status() == "500" and fragment in e.value.message()
    g = grpcclient.InferenceServerClient(faulty.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        g.infer(model, _inputs(grpcclient, 1), outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
    assert e.value.status() == "StatusCode.INTERNAL" and fragment in e.value.message()
    assert _fails(faulty, model) == before + 2
    _good_still_answers(faulty)


def _http_infer(server, model, value, shape=(1,), **kw):
    # one client per call: the sync HTTP client is not to be shared between threads
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    return c.infer(model, _inputs(httpclient, value, shape), **kw)


def test_request_timeout_bounds_a_hanging_model(faulty):
    before = _fails(faulty, "hangs")
    g = grpcclient.InferenceServerClient(faulty.grpc_url)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # both instances sleep 4 s; each request asked for an answer within 0.3 s (Triton's `timeout`, in us)
        slow = [pool.submit(_http_infer, faulty, "hangs", 4000, timeout=300_000),
                pool.submit(g.infer, "hangs", _inputs(grpcclient, 4000), timeout=300_000)]
        time.sleep(0.1)
        # a third one finds no free instance and times out in the queue
        queued = pool.submit(_http_infer, faulty, "hangs", 1, timeout=200_000)
        for f in [*slow, queued]:
            with pytest.raises(InferenceServerException, match="Request timeout expired") as e:
                f.result(timeout=30)
            assert e.value.status() in ("503", "StatusCode.UNAVAILABLE")
        # meanwhile other models are served
        _good_still_answers(faulty)
    assert _fails(faulty, "hangs") >= before + 3
    assert pending_requests(faulty, "hangs") == 0


def test_queue_limit_is_unavailable(faulty):
    h = httpclient.InferenceServerClient(faulty.http_url, concurrency=8, network_timeout=60)
    x = _inputs(httpclient, 700, (1, 1))
    results = [h.async_infer("queued", x) for _ in range(6)]
    ok, refused = 0, []
    for r in results:
        try:
            r.get_result()
            ok += 1
        except InferenceServerException as e:
            refused.append(e)
    # one executing, two waiting; the rest refused at once, never queued without bound
    assert ok >= 3 and ok + len(refused) == 6 and refused
    for e in refused:
        assert e.status() == "503" and "Exceeds maximum queue size" in e.message()
    g = grpcclient.InferenceServerClient(faulty.grpc_url)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(g.infer, "queued", _inputs(grpcclient, 700, (1, 1))) for _ in range(6)]
        errors = [f.exception(timeout=30) for f in futures]
    assert any(e is not None and e.status() == "StatusCode.UNAVAILABLE" for e in errors)


def test_http_client_disconnect_cancels_the_request(faulty):
    before = _fails(faulty, "hangs")
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [10000]}]}).encode()
    host, port = faulty.http_url.split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v2/models/hangs/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while pending_requests(faulty, "hangs") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pending_requests(faulty, "hangs") == 1
    # the client is gone: the request is cancelled and counted, though the model sleeps on for 10 s
    deadline = time.monotonic() + 8
    while pending_requests(faulty, "hangs") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending_requests(faulty, "hangs") == 0
    assert _fails(faulty, "hangs") == before + 1
    _good_still_answers(faulty)


def test_grpc_deadline_cancels_the_request(faulty):
    g = grpcclient.InferenceServerClient(faulty.grpc_url)
    with pytest.raises(InferenceServerException, match="Deadline"):
        g.infer("hangs", _inputs(grpcclient, 3000), client_timeout=0.3)
    deadline = time.monotonic() + 8
    while pending_requests(faulty, "hangs") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending_requests(faulty, "hangs") == 0
    _good_still_answers(faulty)


def test_failing_requests_do_not_accumulate_memory(faulty):
    proc = psutil.Process(faulty.proc.pid)
    h = httpclient.InferenceServerClient(faulty.http_url)
    for _ in range(5):  # warm-up: allocator pools, first-call imports
        with pytest.raises(InferenceServerException):
            h.infer("leaky", _inputs(httpclient, 1))
    rss = proc.memory_info().rss
    for _ in range(40):
        with pytest.raises(InferenceServerException, match="failed holding 33554432 bytes"):
            h.infer("leaky", _inputs(httpclient, 1))
    # 40 x 32 MiB would be kept if failed requests' frames stayed alive
    assert proc.memory_info().rss - rss < 400 * 1024 * 1024


def test_tensor_element_limit(faulty):
    h = httpclient.InferenceServerClient(faulty.http_url)
    with pytest.raises(InferenceServerException, match="--max-tensor-elements") as e:
        h.infer("simple", [_big(httpclient, n) for n in ("INPUT0", "INPUT1")])
    assert e.value.status() == "400"
    g = grpcclient.InferenceServerClient(faulty.grpc_url)
    with pytest.raises(InferenceServerException, match="--max-tensor-elements") as e:
        g.infer("simple", [_big(grpcclient, n) for n in ("INPUT0", "INPUT1")])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    # a shape whose element count no array could hold is the client's mistake too
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [2**62, 2**62, 0], "datatype": "INT32", "data": []}]})
    req = urllib.request.Request(f"http://{faulty.http_url}/v2/models/good/infer", data=body.encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=10)
    assert he.value.code == 400 and "cannot be represented" in json.loads(he.value.read())["error"]


def _big(mod, name):
    big = mod.InferInput(name, [8, 200], "INT32")  # 1600 elements, over the server's 1000
    big.set_data_from_numpy(np.zeros((8, 200), dtype=np.int32))
    return big


def test_grpc_message_limit(faulty):
    g = grpcclient.InferenceServerClient(faulty.grpc_url)
    i = grpcclient.InferInput("INPUT0", [1, 100_000], "BYTES")
    i.set_data_from_numpy(np.array([[b"x"] * 100_000], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        g.infer("simple", [i])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert g.is_server_live()


def test_failed_load_and_reload_keep_serving(faulty):
    h = httpclient.InferenceServerClient(faulty.http_url)
    index = {m["name"]: m for m in h.get_model_repository_index()}
    assert index["fails_load"]["state"] == "UNAVAILABLE" and "cannot load" in index["fails_load"]["reason"]
    assert not h.is_model_ready("fails_load")
    # break the on-disk code of a serving model, then reload it: the old version keeps serving
    code = faulty.repo / "good" / "1" / "model.py"
    original = code.read_text()
    try:
        code.write_text(CODE["fails_load"])
        with pytest.raises(InferenceServerException, match="failed to load 'good'") as e:
            h.load_model("good")
        assert e.value.status() == "500"
        _good_still_answers(faulty)
        code.write_text("this is not python(")
        with pytest.raises(InferenceServerException, match="failed to load 'good'"):
            h.load_model("good")
        _good_still_answers(faulty)
    finally:
        code.write_text(original)
    h.load_model("good")
    _good_still_answers(faulty)
