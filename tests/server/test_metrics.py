"""Prometheus metrics on the metrics port: Triton's names and labels, counters that move by
exactly the traffic sent (success and failure, HTTP and gRPC), agreement with the statistics
extension. (The renderer on its own: tests/unit/test_prometheus.py.)"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ..conftest import Server, make_repo
from ..models import write_test_models

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(server: Server) -> tuple[dict, dict, str]:
    """({(name, frozenset(labels)): value}, {name: type}, content-type)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
        ctype = r.headers["Content-Type"]
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples, types, ctype


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory):
    repo = write_test_models(tmp_path_factory.mktemp("metrics_repo"))
    make_repo(repo, ["simple", "repeat_int32"])
    s = Server(repo).start(tmp_path_factory.mktemp("metrics_logs"))
    yield s
    s.stop()


def _simple_http(c, batch):
    ins = [httpclient.InferInput("INPUT0", [batch, 16], "INT32"), httpclient.InferInput("INPUT1", [batch, 16], "INT32")]
    for i in ins:
        i.set_data_from_numpy(np.ones((batch, 16), dtype=np.int32))
    return c.infer("simple", ins)


def _simple_grpc(c, batch, shape=None):
    shape = shape or [batch, 16]
    ins = [grpcclient.InferInput("INPUT0", shape, "INT32"), grpcclient.InferInput("INPUT1", shape, "INT32")]
    for i in ins:
        i.set_data_from_numpy(np.ones(shape, dtype=np.int32))
    return c.infer("simple", ins)


def test_metrics_endpoint_basics(metrics_server):
    samples, types, ctype = scrape(metrics_server)
    assert ctype.startswith("text/plain")
    assert types["nv_inference_request_success"] == "counter"
    assert types["nv_inference_pending_request_count"] == "gauge"
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                 "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
                 "nv_model_load_duration_secs"):
        assert (name, frozenset({("model", "simple"), ("version", "1")})) in samples, name
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        key = ("nv_inference_request_failure", frozenset({("model", "simple"), ("version", "1"), ("reason", reason)}))
        assert key in samples
    assert value(samples, "nv_model_load_duration_secs", model="simple", version="1") > 0
    for name in ("nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"):
        assert (name, frozenset()) in samples, name
    assert value(samples, "nv_cpu_memory_total_bytes") >= value(samples, "nv_cpu_memory_used_bytes") > 0
    # GPU gauges carry gpu_uuid, and only exist where NVML sees GPUs
    gpu = [k for k in samples if k[0].startswith("nv_gpu_")]
    assert all(dict(k[1]).get("gpu_uuid") for k in gpu)
    # no prometheus-client default collectors, no `_total` suffix on Triton's counters
    assert not any(k[0].startswith(("process_", "python_")) or k[0].endswith("_total") for k in samples)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(metrics_server.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert e.value.code == 404


def test_counters_move_by_exactly_the_traffic(metrics_server):
    s = metrics_server
    hc = httpclient.InferenceServerClient(s.http_url)
    gc = grpcclient.InferenceServerClient(s.grpc_url)
    before, _, _ = scrape(s)

    # successes: 3 over HTTP (batch 1, 2, 4) and 2 over gRPC (batch 3, 1)
    for batch in (1, 2, 4):
        _simple_http(hc, batch)
    for batch in (3, 1):
        _simple_grpc(gc, batch)
    # rejected by the model's config (wrong shape), over both protocols: 2 failures
    with pytest.raises(InferenceServerException):
        _simple_grpc(gc, 1, shape=[1, 15])
    ins = [httpclient.InferInput("INPUT0", [1, 16], "INT32")]
    ins[0].set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    with pytest.raises(InferenceServerException):
        hc.infer("simple", ins)  # INPUT1 missing
    # the model itself fails: 2 backend failures
    for c, mod in ((hc, httpclient), (gc, grpcclient)):
        inp = mod.InferInput("INPUT0", [1], "INT32")
        inp.set_data_from_numpy(np.array([1], dtype=np.int32))
        with pytest.raises(InferenceServerException):
            c.infer("failing", [inp])
    # not a model's traffic at all: unknown model
    with pytest.raises(InferenceServerException):
        gc.get_model_metadata("nope")

    after, _, _ = scrape(s)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    simple = {"model": "simple", "version": "1"}
    assert delta("nv_inference_request_success", **simple) == 5
    assert delta("nv_inference_count", **simple) == 1 + 2 + 4 + 3 + 1
    assert delta("nv_inference_exec_count", **simple) == 5
    assert delta("nv_inference_request_failure", **simple, reason="REJECTED") == 2
    assert delta("nv_inference_request_failure", **simple, reason="BACKEND") == 0
    failing = {"model": "failing", "version": "1"}
    assert delta("nv_inference_request_failure", **failing, reason="BACKEND") == 2
    assert delta("nv_inference_request_success", **failing) == 0
    assert delta("nv_inference_request_duration_us", **simple) > 0
    assert value(after, "nv_inference_pending_request_count", **simple) == 0
    # other models did not move
    assert delta("nv_inference_request_success", model="identity_int32", version="1") == 0

    # the statistics extension reads the same objects
    st = hc.get_inference_statistics("simple")["model_stats"][0]
    assert st["inference_stats"]["success"]["count"] == value(after, "nv_inference_request_success", **simple)
    assert st["inference_stats"]["fail"]["count"] == sum(
        value(after, "nv_inference_request_failure", **simple, reason=r) for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER"))
    assert st["inference_count"] == value(after, "nv_inference_count", **simple)
    assert st["execution_count"] == value(after, "nv_inference_exec_count", **simple)
    assert st["inference_stats"]["success"]["ns"] // 1000 == value(after, "nv_inference_request_duration_us", **simple)
    assert st["inference_stats"]["queue"]["ns"] // 1000 == value(after, "nv_inference_queue_duration_us", **simple)
    hc.close()
    gc.close()


def test_streamed_decoupled_requests_are_counted(metrics_server):
    import queue

    gc = grpcclient.InferenceServerClient(metrics_server.grpc_url)
    before, _, _ = scrape(metrics_server)
    got: queue.Queue = queue.Queue()
    gc.start_stream(callback=lambda result, error: got.put((result, error)))
    for k in range(3):
        ins = [grpcclient.InferInput("IN", [2], "INT32"), grpcclient.InferInput("DELAY", [2], "UINT32"),
               grpcclient.InferInput("WAIT", [1], "UINT32")]
        ins[0].set_data_from_numpy(np.array([k, k], dtype=np.int32))
        ins[1].set_data_from_numpy(np.zeros(2, dtype=np.uint32))
        ins[2].set_data_from_numpy(np.zeros(1, dtype=np.uint32))
        gc.async_stream_infer("repeat_int32", ins, request_id=str(k), enable_empty_final_response=True)
    for _ in range(9):  # two responses and an empty final each
        _, error = got.get(timeout=30)
        assert error is None
    gc.stop_stream()
    after, _, _ = scrape(metrics_server)
    labels = {"model": "repeat_int32", "version": "1"}
    assert value(after, "nv_inference_request_success", **labels) - value(before, "nv_inference_request_success", **labels) == 3
    gc.close()


def test_model_unload_removes_its_series(start_server, tmp_path):
    s = start_server(make_repo(tmp_path / "repo", ["simple"]), "--model-control-mode", "explicit",
                     "--load-model", "simple")
    samples, _, _ = scrape(s)
    assert value(samples, "nv_model_load_duration_secs", model="simple", version="1") > 0
    c = grpcclient.InferenceServerClient(s.grpc_url)
    c.unload_model("simple")
    samples, _, _ = scrape(s)
    assert not any(dict(k[1]).get("model") == "simple" for k in samples)
    c.close()
