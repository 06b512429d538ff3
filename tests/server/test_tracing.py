"""Request tracing through real HTTP and gRPC listeners (torpor.tracing, docs/tracing.md).

The server runs in this process (engine, HTTP and gRPC front ends on a loop of their own in a
thread), so its tracer can be configured as `--trace-config` would and handed an in-memory
OpenTelemetry exporter. Traces are read back from the file Triton's format puts them in."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from torpor.adapters import create_model_function

from torpor.dataplane.engine import Engine, EngineOptions
from torpor.tracing import TraceConfig

from .. import models
from ..conftest import free_port, make_repo

ENGINE_ORDER = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
                "COMPUTE_END", "REQUEST_END"]
HTTP_ORDER = ["HTTP_RECV_START", "HTTP_RECV_END", *ENGINE_ORDER, "HTTP_SEND_START", "HTTP_SEND_END"]
GRPC_ORDER = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", *ENGINE_ORDER, "GRPC_SEND_START", "GRPC_SEND_END"]


class InProcessServer:
    """Engine, HTTP and gRPC listeners on an event loop in a thread of the test process."""

    def __init__(self, repo: Path, config: TraceConfig, span_exporter=None, grpc_host: str = "threads", **options):
        self.repo, self.config, self.span_exporter, self.grpc_host = repo, config, span_exporter, grpc_host
        self.options = {"devices": "", **options}
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.engine: Engine | None = None

    def start(self) -> InProcessServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(120)
        deadline = time.monotonic() + 30
        while True:  # uvicorn listens a moment after its task starts
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    async def _start(self) -> None:
        from torpor.api.grpc import start_grpc_server
        from torpor.api.http import start_http_server

        self.engine = Engine(EngineOptions(model_repositories=[str(self.repo)], **self.options), create_model_function)
        self.engine.tracer.configure(self.config, self.span_exporter)
        await self.engine.start()
        self.http_task, self.stop_http = await start_http_server(self.engine, "127.0.0.1", self.http_port,
                                                                 64 << 20, None, 5.0)
        self.grpc = await start_grpc_server(self.engine, "127.0.0.1", self.grpc_port, host=self.grpc_host)

    def stop(self) -> None:
        """Stop as `torpor serve` does at exit: listeners, then the engine (which writes the traces left)."""
        async def _stop() -> None:
            await self.grpc.stop(1.0)
            await self.stop_http(1.0)
            await asyncio.wait([self.http_task], timeout=5)
            await self.engine.stop()

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def serve(tmp_path):
    started: list[InProcessServer] = []

    def _serve(config: TraceConfig, models_=("simple",), span_exporter=None, **kw) -> InProcessServer:
        repo = tmp_path / f"repo{len(started)}"
        if not repo.exists():
            make_repo(repo, list(models_))
        s = InProcessServer(repo, config, span_exporter, **kw).start()
        started.append(s)
        return s

    yield _serve
    for s in started:
        if s.thread.is_alive():
            s.stop()


def simple_inputs(client) -> list:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [client.InferInput("INPUT0", [1, 16], "INT32"), client.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(np.ones_like(a))
    return inputs


def read_traces(path: Path) -> dict[int, dict]:
    """Triton's trace file, grouped by trace id: {id: {"info": {...}, "stamps": {name: ns}}}."""
    objects = json.loads(path.read_text())
    assert isinstance(objects, list) and objects
    out: dict[int, dict] = {}
    for o in objects:
        t = out.setdefault(o["id"], {"info": None, "stamps": {}})
        if "timestamps" in o:
            assert set(o) == {"id", "timestamps"}
            for ts in o["timestamps"]:
                assert ts["name"] not in t["stamps"], f"{ts['name']} twice in trace {o['id']}"
                t["stamps"][ts["name"]] = ts["ns"]
        else:
            assert t["info"] is None
            t["info"] = o
    return out


def finished_spans(server: InProcessServer, exporter, roots: int) -> list:
    """The exported spans once `roots` requests are in (a trace ends after its answer is sent,
    a moment after the client has it)."""
    deadline = time.monotonic() + 10
    while True:
        server.engine.tracer.flush()
        spans = exporter.get_finished_spans()
        if sum(sp.name == "InferRequest" for sp in spans) >= roots or time.monotonic() > deadline:
            return list(spans)
        time.sleep(0.05)


def assert_ordered(stamps: dict[str, int], order: list[str]) -> None:
    values = [stamps[name] for name in order]
    assert values == sorted(values), list(zip(order, values, strict=True))


def post(url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_requests_are_written_in_tritons_trace_file(serve, tmp_path):
    path = tmp_path / "trace.json"
    s = serve(TraceConfig(level=["TIMESTAMPS"], rate=1, file=str(path)))
    client = httpclient.InferenceServerClient(s.http_url)
    before = time.monotonic_ns()
    for i in range(3):
        client.infer("simple", simple_inputs(httpclient), request_id=f"req-{i}")
    assert not path.exists()  # log_frequency 0: written at exit, as Triton
    s.stop()
    after = time.monotonic_ns()
    traces = read_traces(path)
    assert sorted(traces) == [1, 2, 3]
    assert [t["info"] for t in traces.values()] == [
        {"id": i + 1, "model_name": "simple", "model_version": 1, "request_id": f"req-{i}"} for i in range(3)]
    for t in traces.values():
        stamps = t["stamps"]
        assert set(stamps) == {*HTTP_ORDER, "INFER_RESPONSE_COMPLETE"}
        assert_ordered(stamps, HTTP_ORDER)
        assert stamps["COMPUTE_OUTPUT_START"] <= stamps["INFER_RESPONSE_COMPLETE"] <= stamps["REQUEST_END"]
        # Triton's steady clock: this process's monotonic clock
        assert before <= stamps["HTTP_RECV_START"] and stamps["HTTP_SEND_END"] <= after
    # one request after another: each trace ends before the next begins
    ends = [traces[i]["stamps"]["HTTP_SEND_END"] for i in (1, 2)]
    assert ends[0] < traces[2]["stamps"]["HTTP_RECV_START"] and ends[1] < traces[3]["stamps"]["HTTP_RECV_START"]


@pytest.mark.parametrize("host", ["threads", "aio"])
def test_grpc_requests_are_written_with_grpc_stamps(serve, tmp_path, host):
    path = tmp_path / "trace.json"
    s = serve(TraceConfig(level=["TIMESTAMPS"], rate=1, file=str(path)), grpc_host=host)
    client = grpcclient.InferenceServerClient(s.grpc_url)
    out = client.infer("simple", simple_inputs(grpcclient), request_id="g-1")
    assert out.as_numpy("OUTPUT0")[0, 3] == 4
    client.close()
    time.sleep(0.2)  # the call's end reaches the server after the client has its answer
    s.stop()
    (trace,) = read_traces(path).values()
    assert trace["info"] == {"id": 1, "model_name": "simple", "model_version": 1, "request_id": "g-1"}
    assert set(trace["stamps"]) == {*GRPC_ORDER, "INFER_RESPONSE_COMPLETE"}
    assert_ordered(trace["stamps"], GRPC_ORDER)


def test_log_frequency_writes_numbered_files(serve, tmp_path):
    path = tmp_path / "trace.json"
    s = serve(TraceConfig(level=["TIMESTAMPS"], rate=1, file=str(path), log_frequency=2))
    client = httpclient.InferenceServerClient(s.http_url)
    for i in range(3):
        client.infer("simple", simple_inputs(httpclient), request_id=f"r{i}")
    first = Path(f"{path}.0")
    assert [t["info"]["request_id"] for t in read_traces(first).values()] == ["r0", "r1"]  # while serving
    assert not Path(f"{path}.1").exists()
    s.stop()
    assert [t["info"]["request_id"] for t in read_traces(Path(f"{path}.1")).values()] == ["r2"]
    assert not path.exists()


def test_rate_and_count_sample_as_triton(serve, tmp_path):
    """rate=2, count=2: the 2nd and 4th requests are traced, then none (Triton 2.51 traced r2,
    r4, r6 of nine with count 3); the count is shown counting down."""
    path = tmp_path / "trace.json"
    s = serve(TraceConfig(level=["TIMESTAMPS"], rate=2, count=2, file=str(path)))
    client = httpclient.InferenceServerClient(s.http_url)
    for i in range(1, 8):
        client.infer("simple", simple_inputs(httpclient), request_id=f"r{i}")
    settings = client.get_trace_settings()
    assert settings["trace_count"] == "0" and settings["trace_rate"] == "2"
    s.stop()
    assert [t["info"]["request_id"] for t in read_traces(path).values()] == ["r2", "r4"]


def test_a_models_own_settings_sample_it_alone(serve, tmp_path):
    """Global rate 1000 traces nothing here; simple_identity's own rate 1 traces each of its
    requests, on its own counter; simple keeps the global one."""
    path = tmp_path / "trace.json"
    s = serve(TraceConfig(level=["TIMESTAMPS"], rate=1000, file=str(path)), models_=("simple", "simple_identity"))
    client = httpclient.InferenceServerClient(s.http_url)
    m = client.update_trace_settings("simple_identity", settings={"trace_rate": "1", "trace_count": "2"})
    assert m["trace_rate"] == "1" and m["trace_count"] == "2" and m["trace_level"] == ["TIMESTAMPS"]
    text = httpclient.InferInput("INPUT0", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hi"]], dtype=np.object_))
    for i in range(3):
        client.infer("simple", simple_inputs(httpclient), request_id=f"s{i}")
        client.infer("simple_identity", [text], request_id=f"i{i}")
    assert client.get_trace_settings("simple_identity")["trace_count"] == "0"
    assert client.get_trace_settings()["trace_count"] == "-1"
    s.stop()
    traced = [(t["info"]["model_name"], t["info"]["request_id"]) for t in read_traces(path).values()]
    assert traced == [("simple_identity", "i0"), ("simple_identity", "i1")]


def test_bad_settings_get_tritons_errors(serve, tmp_path):
    s = serve(TraceConfig(file=str(tmp_path / "t.json")))
    url = f"http://{s.http_url}/v2/trace/setting"
    before = post(url)[1]
    cases = [
        ({"trace_rate": "abc"}, 400, "Unable to parse 'trace_rate', got: abc"),
        ({"trace_rate": "0"}, 400, "Attempting to set invalid trace setting :sample rate must be non-zero"),
        ({"trace_count": "-2"}, 400, "Unable to parse 'trace_count'. Expecting value >= -1, got: -2"),
        ({"log_frequency": "x"}, 400, "Unable to parse 'log_frequency', got: x"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, 400, "Expect only one trace level 'OFF' is specified"),
        ({"trace_level": ["LOUD"]}, 400, "invalid trace level 'LOUD'"),
        # all or nothing: the good rate is not kept when the level is refused
        ({"trace_rate": "7", "trace_level": ["LOUD"]}, 400, "invalid trace level 'LOUD'"),
        ({"trace_file": "/tmp/elsewhere.json"}, 501, "trace file location can not be updated through network protocol"),
    ]
    for body, status, text in cases:
        assert post(url, body) == (status, {"error": text}), body
    assert post(url, b"{not json")[0] == 400
    assert post(url)[1] == before
    code, err = post(f"http://{s.http_url}/v2/models/simple/trace/setting", {"trace_count": "-5"})
    assert (code, err) == (400, {"error": "Unable to parse 'trace_count'. Expecting value >= -1, got: -5"})
    client = grpcclient.InferenceServerClient(s.grpc_url)
    with pytest.raises(Exception) as e:
        client.update_trace_settings(settings={"trace_rate": "abc"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message() == "Unable to parse 'trace_rate', got: abc"
    ok = client.update_trace_settings(settings={"trace_rate": "3", "trace_level": ["TIMESTAMPS"]}, as_json=True)
    assert ok["settings"]["trace_rate"]["value"] == ["3"] and ok["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
    client.close()


def test_tracing_without_a_file_is_refused(serve):
    """Triton refuses a trace level when there is no trace file to write to."""
    s = serve(TraceConfig())
    code, err = post(f"http://{s.http_url}/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]})
    assert (code, err) == (400, {"error": "Attempting to set invalid trace setting :trace file name is not given"})
    assert post(f"http://{s.http_url}/v2/trace/setting", {"trace_rate": "5"})[1]["trace_rate"] == "5"


def test_opentelemetry_spans_reach_the_exporter(serve):
    pytest.importorskip("opentelemetry.sdk.trace", reason="the test extra brings opentelemetry-sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    config = TraceConfig(mode="opentelemetry", level=["TIMESTAMPS"], rate=1,
                         resource={"service.name": "torpor-test", "test.key": "test.value"})
    s = serve(config, span_exporter=exporter)
    assert s.engine.trace_settings()["trace_mode"] == "opentelemetry"
    http = httpclient.InferenceServerClient(s.http_url)
    http.infer("simple", simple_inputs(httpclient), request_id="otel-1")
    spans = {sp.name: sp for sp in finished_spans(s, exporter, 1)}
    assert set(spans) == {"InferRequest", "simple", "compute"}
    root, model, compute = spans["InferRequest"], spans["simple"], spans["compute"]
    assert root.parent is None and model.parent.span_id == root.context.span_id
    assert compute.parent.span_id == model.context.span_id
    assert {e.name for e in root.events} == {"HTTP_RECV_START", "HTTP_RECV_END", "INFER_RESPONSE_COMPLETE",
                                              "HTTP_SEND_START", "HTTP_SEND_END"}
    assert [e.name for e in model.events] == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
    assert [e.name for e in compute.events] == ["COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
                                                "COMPUTE_END"]
    assert dict(model.attributes) == {"triton.model_name": "simple", "triton.model_version": 1,
                                      "triton.trace_id": 1, "triton.trace_parent_id": 0,
                                      "triton.request_id": "otel-1"}
    assert root.resource.attributes["service.name"] == "torpor-test"
    assert root.resource.attributes["test.key"] == "test.value"
    # OpenTelemetry's wall clock: within this test's time
    assert abs(root.start_time - time.time_ns()) < 60e9 and root.start_time <= model.start_time <= root.end_time


def test_a_propagated_context_is_traced_whatever_the_rate(serve):
    """With rate 1000 only requests carrying a W3C traceparent are traced, as children of the
    client's span, over HTTP headers and gRPC metadata alike."""
    pytest.importorskip("opentelemetry.sdk.trace", reason="the test extra brings opentelemetry-sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    s = serve(TraceConfig(mode="opentelemetry", level=["TIMESTAMPS"], rate=1000), span_exporter=exporter)
    parent = "00-0af7651916cd43dd8448eb211c12666c-b7ad6b7169242424-01"
    http = httpclient.InferenceServerClient(s.http_url)
    http.infer("simple", simple_inputs(httpclient))  # not sampled: the 1st of every 1000
    http.infer("simple", simple_inputs(httpclient), headers={"traceparent": parent})  # (tritonclient adds to it)
    grpc = grpcclient.InferenceServerClient(s.grpc_url)
    grpc.infer("simple", simple_inputs(grpcclient), headers={"traceparent": parent})
    grpc.close()
    roots = [sp for sp in finished_spans(s, exporter, 2) if sp.name == "InferRequest"]
    assert len(roots) == 2
    for root in roots:
        assert f"{root.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c12666c"
        assert f"{root.parent.span_id:016x}" == "b7ad6b7169242424"
    assert sorted(e.name for r in roots for e in r.events if e.name.endswith("_START"))[:2] == [
        "GRPC_SEND_START", "GRPC_WAITREAD_START"]


def test_late_binding_stamps_the_wait_and_the_copy(serve, tmp_path):
    """On a CPU virtual device: the first request of a model (not profiled at load, so not on
    the device yet) waits for its turn and copies the weights in (TORPOR_STAGE_*,
    TORPOR_MEMORY_END, TORPOR_COPY_*); the next finds it resident."""
    pytest.importorskip("torch")
    repo = tmp_path / "mlp"
    (repo / "mlp0" / "1").mkdir(parents=True)
    (repo / "mlp0" / "config.pbtxt").write_text(models.mlp_config("mlp0", 7, 256))
    path = tmp_path / "trace.json"
    s = InProcessServer(repo, TraceConfig(level=["TIMESTAMPS"], rate=1, file=str(path)), devices="cpu",
                        device_memory_bytes="8MiB", profile_runs=0).start()
    try:
        client = httpclient.InferenceServerClient(s.http_url)
        x = httpclient.InferInput("input", [1, 256], "FP32")
        x.set_data_from_numpy(np.ones((1, 256), np.float32))
        client.infer("mlp0", [x], request_id="cold")
        client.infer("mlp0", [x], request_id="warm")
    finally:
        s.stop()
    cold, warm = (t["stamps"] for t in read_traces(path).values())
    assert_ordered(cold, ["COMPUTE_START", "TORPOR_STAGE_START", "TORPOR_STAGE_END", "TORPOR_MEMORY_END",
                          "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"])
    assert cold["TORPOR_MEMORY_END"] == cold["COMPUTE_INPUT_END"]
    # the copy may start at arrival, before the request's turn (the scheduler's early copy), and
    # runs under the execution (layer groups compute as they land)
    assert cold["REQUEST_START"] <= cold["TORPOR_COPY_START"] <= cold["TORPOR_COPY_END"] <= cold["COMPUTE_END"]
    assert {"TORPOR_STAGE_START", "TORPOR_MEMORY_END"} <= set(warm) and "TORPOR_COPY_START" not in warm
    # the worker's start of the run, and the scheduler's predicted end beside the real one
    for t in (cold, warm):
        assert t["TORPOR_MEMORY_END"] <= t["TORPOR_EXEC_START"] <= t["COMPUTE_END"]
        assert t["REQUEST_START"] < t["TORPOR_PREDICTED_END"] < t["REQUEST_START"] + 10**9


def test_torpor_serve_traces_with_tritons_flags(simple_repo, start_server, tmp_path):
    """`torpor serve --trace-config ...` as a tritonserver launch script passes it: the trace
    file holds the request, written when the server exits (log frequency 0)."""
    path = tmp_path / "serve-trace.json"
    s = start_server(simple_repo, "--trace-config", f"triton,file={path}", "--trace-config", "level=TIMESTAMPS",
                     "--trace-config", "rate=1")
    client = httpclient.InferenceServerClient(s.http_url)
    client.infer("simple", simple_inputs(httpclient), request_id="from-cli")
    assert s.stop() == 0
    traces = read_traces(path)
    (t,) = [t for t in traces.values() if t["info"]["request_id"] == "from-cli"]
    assert t["info"]["model_name"] == "simple"
    assert_ordered(t["stamps"], HTTP_ORDER)
