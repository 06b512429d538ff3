"""Drop-in down to the details (issue 19): the behaviours Triton's own tests and clients pin, one
test per point, over HTTP and gRPC where both apply. What each test expects was observed on a
real tritonserver 2.51 (python backend) beside Torpor and checked against Triton's current
source where it has changed since; the deliberate differences are in docs/compatibility.md."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from ..conftest import ROOT, Server, free_port, pending_requests
from ..models import FAILING_MODEL, IDENTITY_MODEL

PROTOCOLS = ["http", "grpc"]

# -- the models ---------------------------------------------------------------------------------

_IDENT = IDENTITY_MODEL
_IDENT2 = IDENTITY_MODEL.replace('pb_utils.Tensor("OUTPUT0", x)]', 'pb_utils.Tensor("OUTPUT0", x), pb_utils.Tensor("OUTPUT1", x)]')
assert _IDENT2 != _IDENT

_BAD_UTF8 = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        arr = np.array([b"ok", b"\\xff\\xfe"], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", arr)]) for _ in requests]
'''

_SLOW = IDENTITY_MODEL.replace("    def execute(self, requests):\n",
                               "    def execute(self, requests):\n        __import__('time').sleep(0.8)\n")
assert _SLOW != IDENTITY_MODEL

# every request learns how many requests its execute call was given
_BATCH_SEEN = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        n = np.array([[len(requests)]], dtype=np.int32)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", n)]) for _ in requests]
'''

# execute returns at once; three responses and the final flag follow from a thread of its own
_DECOUPLED = '''
import threading
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            threading.Thread(target=self._send, args=(r.get_response_sender(), x), daemon=True).start()
        return None

    def _send(self, sender, x):
        for i in range(3):
            time.sleep(0.3)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x + i)]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

def _io(dt: str, dims: str, outputs: int = 1, in_dt: str | None = None) -> str:
    outs = ", ".join(f'{{ name: "OUTPUT{i}" data_type: {dt} dims: {dims} }}' for i in range(outputs))
    return f'input [ {{ name: "INPUT0" data_type: {in_dt or dt} dims: {dims} }} ]\noutput [ {outs} ]\n'


def _write(repo, name: str, config: str, code: str) -> None:
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n' + config)
    (d / "1" / "model.py").write_text(code)


def write_dropin_models(repo):
    _write(repo, "ident_fp32", "max_batch_size: 0\n" + _io("TYPE_FP32", "[ -1 ]", 2), _IDENT2)
    _write(repo, "ident_fixed", "max_batch_size: 0\n" + _io("TYPE_FP32", "[ 2, 2 ]"), _IDENT)
    _write(repo, "ident_batched", "max_batch_size: 8\n" + _io("TYPE_FP32", "[ 4 ]"), _IDENT)
    _write(repo, "ident_2d", "max_batch_size: 0\n" + _io("TYPE_FP32", "[ -1, -1 ]"), _IDENT)
    _write(repo, "ident_string", "max_batch_size: 0\n" + _io("TYPE_STRING", "[ 1 ]"), _IDENT)
    _write(repo, "ident_strings", "max_batch_size: 0\n" + _io("TYPE_STRING", "[ -1 ]"), _IDENT)
    _write(repo, "two_inputs", "max_batch_size: 0\n"
           'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, '
           '{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
           'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n', _IDENT)
    _write(repo, "bad_utf8", 'max_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
           'output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 2 ] } ]\n', _BAD_UTF8)
    _write(repo, "slow", "max_batch_size: 0\n" + _io("TYPE_INT32", "[ -1 ]"), _SLOW)
    _write(repo, "queued", "max_batch_size: 8\n" + _io("TYPE_INT32", "[ 1 ]") +
           "dynamic_batching { max_queue_delay_microseconds: 1000000 default_queue_policy { max_queue_size: 1 } }\n",
           _IDENT)
    _write(repo, "batch_seen", "max_batch_size: 4\n" + _io("TYPE_INT32", "[ 1 ]") +
           "dynamic_batching { max_queue_delay_microseconds: 3000000 }\n", _BATCH_SEEN)
    _write(repo, "decoupled_slow", "max_batch_size: 0\n" + _io("TYPE_INT32", "[ 1 ]") +
           "model_transaction_policy { decoupled: true }\n", _DECOUPLED)
    _write(repo, "failing", "max_batch_size: 0\n" + _io("TYPE_INT32", "[ 1 ]"), FAILING_MODEL)
    _write(repo, "classifier", "max_batch_size: 0\n" + _io("TYPE_FP32", "[ 5 ]"), _IDENT)
    return repo


@pytest.fixture(scope="module")
def dropin(tmp_path_factory):
    """A server over the models above, client shared memory allowed."""
    repo = write_dropin_models(tmp_path_factory.mktemp("dropin_repo"))
    s = Server(repo, "--allow-client-shm", "true").start(tmp_path_factory.mktemp("dropin_logs"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server with Torpor's (and Triton's current) default: client shared memory off; and a
    small --http-max-input-size."""
    repo = tmp_path_factory.mktemp("strict_repo")
    _write(repo, "ident_fp32", "max_batch_size: 0\n" + _io("TYPE_FP32", "[ -1 ]", 2), _IDENT2)
    s = Server(repo, "--http-max-input-size", "1024").start(tmp_path_factory.mktemp("strict_logs"))
    yield s
    s.stop()


# -- helpers -------------------------------------------------------------------------------------

def client(server: Server, protocol: str):
    if protocol == "http":
        return httpclient, httpclient.InferenceServerClient(server.http_url)
    return grpcclient, grpcclient.InferenceServerClient(server.grpc_url)


def post(server: Server, model: str, body: bytes | dict, headers: dict | None = None):
    """(status, headers, body) of a raw infer request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/infer", data=data, method="POST",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def error(server: Server, model: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, str]:
    status, _, out = post(server, model, body, headers)
    return status, json.loads(out)["error"] if status != 200 else ""


def refused(fn, status_http: str, status_grpc: str, text: str, protocol: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        fn()
    assert e.value.status() == (status_http if protocol == "http" else status_grpc), e.value.message()
    assert text in e.value.message(), e.value.message()


def fp32_input(mod, name: str = "INPUT0", n: int = 4):
    x = mod.InferInput(name, [n], "FP32")
    x.set_data_from_numpy(np.arange(n, dtype=np.float32))
    return x


def int_input(mod, shape=(1,), value: int = 1):
    x = mod.InferInput("INPUT0", list(shape), "INT32")
    x.set_data_from_numpy(np.full(shape, value, dtype=np.int32))
    return x


def binary_outputs(status: int, headers: dict, body: bytes) -> tuple[dict, bytes]:
    assert status == 200, body
    n = int(headers["inference-header-content-length"])
    return json.loads(body[:n]), body[n:]


# -- 1. raw binary requests ----------------------------------------------------------------------

def test_raw_binary_request_deduces_the_only_input(dropin):
    """`Inference-Header-Content-Length: 0`: the body is the model's only input; its shape comes
    from the config (batch 1, one variable dimension from the byte count) and the outputs are
    binary by default. HTTP only: gRPC has no such request."""
    x = np.arange(4, dtype=np.float32).tobytes()
    raw = {"Inference-Header-Content-Length": "0"}
    doc, blob = binary_outputs(*post(dropin, "ident_fp32", x, raw))
    assert [(o["name"], o["shape"], o["parameters"]["binary_data_size"]) for o in doc["outputs"]] == [
        ("OUTPUT0", [4], 16), ("OUTPUT1", [4], 16)]
    assert blob == x + x
    doc, blob = binary_outputs(*post(dropin, "ident_fixed", x, raw))
    assert doc["outputs"][0]["shape"] == [2, 2] and blob == x
    doc, blob = binary_outputs(*post(dropin, "ident_batched", x, raw))
    assert doc["outputs"][0]["shape"] == [1, 4] and blob == x
    # BYTES: the whole body is the one element (the response carries it length-prefixed)
    doc, blob = binary_outputs(*post(dropin, "ident_string", b"427", raw))
    assert doc["outputs"][0]["shape"] == [1] and blob == b"\x03\x00\x00\x00427"
    # an empty body is an empty input, with or without the header (Triton: the JSON is the body)
    for headers in (raw, {}):
        status, out_headers, out = post(dropin, "ident_fp32", b"", headers)
        n = out_headers.get("inference-header-content-length")
        assert status == 200, out
        assert json.loads(out[:int(n)] if n else out)["outputs"][0]["shape"] == [0]


def test_raw_binary_request_refusals_in_tritons_words(dropin):
    raw = {"Inference-Header-Content-Length": "0"}
    x = np.arange(4, dtype=np.float32).tobytes()
    for model, body, text in [
        ("ident_fixed", x[:8], "input byte size mismatch for input 'INPUT0' for model 'ident_fixed'. Expected 16, got 8"),
        ("ident_batched", x + x, "Expected 16, got 32"),
        ("ident_fp32", x[:6], "Expected 4, got 6"),
        ("two_inputs", x, ("Raw request must only have 1 input (found 1) to be deduced but got 2 inputs in "
                           "'two_inputs' model configuration")),
        ("ident_2d", x, ("The shape of the raw input 'INPUT0' can not be deduced because there are more than one "
                         "variable-sized dimension")),
        ("ident_strings", b"427", "For BYTE datatype raw input 'INPUT0', the model must have input shape [1]"),
    ]:
        status, message = error(dropin, model, body, raw)
        assert status == 400 and text in message, (model, status, message)


# -- 2. duplicate requested outputs --------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_duplicate_requested_outputs_are_refused(dropin, protocol):
    """Triton >= 2.69 answers INVALID_ARG (2.51 merged the two into one output)."""
    mod, c = client(dropin, protocol)
    outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1"), mod.InferRequestedOutput("OUTPUT0")]
    refused(lambda: c.infer("ident_fp32", [fp32_input(mod)], outputs=outs), "400", "StatusCode.INVALID_ARGUMENT",
            "output 'OUTPUT0' already exists in request", protocol)
    r = c.infer("ident_fp32", [fp32_input(mod)], outputs=outs[:2])
    assert r.as_numpy("OUTPUT0").tolist() == [0, 1, 2, 3]
    assert c.is_server_live()


# -- 3. shared-memory status with client shared memory off ---------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shm_status_answers_with_client_shm_off(strict, protocol):
    """Triton gates register and unregister only (off by default since 2.69, as in Torpor)."""
    _, c = client(strict, protocol)
    st = c.get_system_shared_memory_status()
    assert (st == []) if protocol == "http" else (len(st.regions) == 0)
    st = c.get_cuda_shared_memory_status()
    assert (st == []) if protocol == "http" else (len(st.regions) == 0)
    refused(lambda: c.get_system_shared_memory_status("r"), "404", "StatusCode.NOT_FOUND",
            "Unable to find system shared memory region: 'r'", protocol)
    for fn in (lambda: c.register_system_shared_memory("r", "/k", 64), lambda: c.unregister_system_shared_memory()):
        refused(fn, "501", "StatusCode.UNIMPLEMENTED", "Client shared memory is disabled. Start the server with "
                "'--allow-client-shm=true' to enable.", protocol)


# -- 4. unregistering a region in use ------------------------------------------------------------

@pytest.fixture
def region():
    made = []

    def _make(byte_size: int = 64):
        key = f"/torpor_dropin_{uuid.uuid4().hex[:12]}"
        made.append(shm.create_shared_memory_region(key.strip("/"), key, byte_size))
        return key, made[-1]

    yield _make
    for h in made:
        shm.destroy_shared_memory_region(h)


def _names(c, protocol):
    st = c.get_system_shared_memory_status()
    return sorted(r["name"] for r in st) if protocol == "http" else sorted(st.regions)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unregistering_a_region_in_use_waits_for_its_requests(dropin, region, protocol):
    """Triton (>= 2.53) keeps a region that requests in flight use registered, listed and usable,
    and drops it when the last of them finishes; the requests succeed."""
    _, c = client(dropin, protocol)
    c.unregister_system_shared_memory()
    in_key, in_h = region()
    out_key, out_h = region()
    shm.set_shared_memory_region(in_h, [np.arange(4, dtype=np.int32)])
    c.register_system_shared_memory("in_r", in_key, 64)
    c.register_system_shared_memory("out_r", out_key, 64)
    result: dict = {}

    def infer():
        m, own = client(dropin, protocol)
        x = m.InferInput("INPUT0", [4], "INT32")
        x.set_shared_memory("in_r", 16)
        o = m.InferRequestedOutput("OUTPUT0")
        o.set_shared_memory("out_r", 16)
        try:
            result["ok"] = own.infer("slow", [x], outputs=[o])
        except InferenceServerException as e:
            result["error"] = e

    t = threading.Thread(target=infer)
    t.start()
    deadline = time.monotonic() + 10
    while pending_requests(dropin, "slow") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    c.unregister_system_shared_memory("out_r")
    c.unregister_system_shared_memory()
    assert _names(c, protocol) == ["in_r", "out_r"]  # still listed while the request runs
    refused(lambda: c.register_system_shared_memory("out_r", out_key, 64), "400", "StatusCode.ALREADY_EXISTS",
            "shared memory region 'out_r' already in manager", protocol)
    t.join(30)
    assert "error" not in result, result.get("error")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.int32, [4]), np.arange(4))
    assert _names(c, protocol) == []  # gone with the last request that used them


# -- 5. reserved shm keys ------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reserved_and_invalid_shm_keys_are_refused(dropin, protocol):
    _, c = client(dropin, protocol)
    prefix = "triton_python_backend_shm_region_"
    for key in (f"{prefix}x", f"/{prefix}x", f"///{prefix}x"):
        refused(lambda k=key: c.register_system_shared_memory("mine", k, 64), "400", "StatusCode.INVALID_ARGUMENT",
                f"cannot register shared memory region 'mine' with key '{key}' as the key contains the reserved "
                f"prefix '{prefix}'", protocol)
    for key in ("/", "///"):
        refused(lambda k=key: c.register_system_shared_memory("mine", k, 64), "400", "StatusCode.INVALID_ARGUMENT",
                f"cannot register shared memory region 'mine' - invalid shm key '{key}'", protocol)
    assert _names(c, protocol) == []


# -- 6. non-UTF-8 BYTES in a JSON response --------------------------------------------------------

def test_non_utf8_bytes_are_not_altered_into_json(dropin):
    """Triton writes the bytes into the JSON as they are (an invalid document its client refuses
    with "Please use binary_data=True"); Torpor refuses with the same advice, never replacing
    them with U+FFFD. Binary output, and gRPC, carry them intact."""
    body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1], "data": [1]}]}
    status, message = error(dropin, "bad_utf8", body)
    assert status == 400 and "Please use binary_data=True, if you want to pass a byte array" in message
    assert "OUTPUT0" in message
    h = httpclient.InferenceServerClient(dropin.http_url)
    r = h.infer("bad_utf8", [int_input(httpclient)], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)])
    assert r.as_numpy("OUTPUT0").tolist() == [b"ok", b"\xff\xfe"]
    g = grpcclient.InferenceServerClient(dropin.grpc_url)
    assert g.infer("bad_utf8", [int_input(grpcclient)]).as_numpy("OUTPUT0").tolist() == [b"ok", b"\xff\xfe"]
    # valid UTF-8 still travels as JSON text
    body = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1], "data": ["h\u00e9"]}]}
    status, _, out = post(dropin, "ident_strings", body)
    assert status == 200 and json.loads(out)["outputs"][0]["data"] == ["h\u00e9"]


# -- 7. queueing: the batch window and max_queue_size ---------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_batch_window_holds_and_the_queue_limit_refuses(dropin, protocol):
    """max_queue_delay_microseconds 1 s, max_queue_size 1: the first request waits out the batch
    window (it is the one queued), the next two find the queue full: 503 / UNAVAILABLE."""
    results: list = [None] * 3

    def one(i):
        mod, c = client(dropin, protocol)
        t0 = time.monotonic()
        try:
            c.infer("queued", [int_input(mod, (1, 1), i)])
            results[i] = ("ok", time.monotonic() - t0)
        except InferenceServerException as e:
            results[i] = (e.status(), e.message())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    ok = [r for r in results if r[0] == "ok"]
    full = [r for r in results if r[0] != "ok"]
    assert len(ok) == 1 and ok[0][1] >= 0.8, results  # held for the window
    assert len(full) == 2, results
    for status, message in full:
        assert status == ("503" if protocol == "http" else "StatusCode.UNAVAILABLE")
        assert "Exceeds maximum queue size" in message


def test_dynamic_batching_hands_a_python_model_its_requests_together(dropin):
    """What Triton's python backend does with dynamic batching: requests that meet in the batch
    window reach one `execute` call (the model answers with the number it was given)."""
    with grpcclient.InferenceServerClient(dropin.grpc_url) as c:
        before = c.get_inference_statistics("batch_seen").model_stats[0].execution_count
    seen: list = [None] * 4

    def one(i):
        with grpcclient.InferenceServerClient(dropin.grpc_url) as own:
            seen[i] = int(own.infer("batch_seen", [int_input(grpcclient, (1, 1))]).as_numpy("OUTPUT0")[0, 0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == [4, 4, 4, 4]  # the batch filled up (max_batch_size 4) before its window closed
    with grpcclient.InferenceServerClient(dropin.grpc_url) as c:
        st = c.get_inference_statistics("batch_seen").model_stats[0]
    assert st.execution_count == before + 1
    # Triton's batch_stats: the execution counted once, under the rows it ran
    assert {b.batch_size: b.compute_infer.count for b in st.batch_stats}.get(4) == 1


# -- 8. decoupled models: the instance is free when execute returns -------------------------------

def test_decoupled_streams_overlap(dropin):
    """Three streams to a one-instance decoupled model whose execute returns at once and whose
    three responses come from its own thread, 0.3 s apart: Triton (and Torpor) answers them
    side by side (about 0.9 s), not one stream after another (2.7 s)."""
    t0 = time.monotonic()
    arrivals: dict = {}

    def stream(i):
        got: queue.Queue = queue.Queue()
        c = grpcclient.InferenceServerClient(dropin.grpc_url)
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        c.async_stream_infer("decoupled_slow", [int_input(grpcclient, (1,), 10 * i)])
        times = []
        for _ in range(3):
            result, err = got.get(timeout=20)
            assert err is None, err
            times.append((time.monotonic() - t0, int(result.as_numpy("OUTPUT0")[0])))
        c.stop_stream()
        arrivals[i] = times

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(arrivals) == [0, 1, 2]
    for i, times in arrivals.items():
        assert [v for _, v in times] == [10 * i, 10 * i + 1, 10 * i + 2]
    # every stream's first response comes before any stream's last: they overlapped
    assert max(times[0][0] for times in arrivals.values()) < min(times[-1][0] for times in arrivals.values())
    assert max(times[-1][0] for times in arrivals.values()) < 2.2


# -- 9. start-up and parameter validation ---------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_and_classification_parameters_are_validated(dropin, protocol):
    mod, c = client(dropin, protocol)
    if protocol == "http":
        # Triton reads both as JSON unsigned integers (it answers 500; Torpor 400)
        refused(lambda: c.infer("ident_fp32", [fp32_input(mod)], timeout=-1), "400", "",
                "Unable to parse 'timeout': attempt to access JSON non-unsigned-integer as unsigned-integer", protocol)
        body = {"parameters": {"timeout": 1.5}, "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1],
                                                            "data": [1]}]}
        assert error(dropin, "ident_fp32", body)[0] == 400
    else:
        # gRPC takes timeout as an int64 and reads it unsigned: a negative one means none
        assert c.infer("ident_fp32", [fp32_input(mod)], timeout=-1).as_numpy("OUTPUT0").tolist() == [0, 1, 2, 3]
        stub = pbg.GRPCInferenceServiceStub(c._channel)
        req = pb.ModelInferRequest(model_name="ident_fp32")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
        req.raw_input_contents.append(np.ones(1, np.float32).tobytes())
        req.parameters["timeout"].double_param = 5.0
        import grpc

        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "invalid value type for 'timeout' parameter, expected int64_param."
    x = mod.InferInput("INPUT0", [5], "FP32")
    x.set_data_from_numpy(np.arange(5, dtype=np.float32))
    refused(lambda: c.infer("classifier", [x], outputs=[mod.InferRequestedOutput("OUTPUT0", class_count=-1)]),
            "400", "StatusCode.INVALID_ARGUMENT",
            "Unable to set 'classification'" if protocol == "http" else
            "invalid value for 'classification' parameter, expected >= 0", protocol)
    r = c.infer("classifier", [x], outputs=[mod.InferRequestedOutput("OUTPUT0", class_count=2)])
    assert r.as_numpy("OUTPUT0").tolist() == [b"4.000000:4", b"3.000000:3"]


def test_http_max_input_size_must_be_positive(tmp_path):
    """tritonserver refuses to start: "Error: --http-max-input-size must be greater than 0."."""
    (tmp_path / "empty").mkdir()
    for value in ("0", "-5"):
        r = subprocess.run([sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(tmp_path / "empty"),
                            "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                            "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                            "--metrics-port", str(free_port()), "--devices", "none", "--http-max-input-size", value],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode != 0, r.stdout + r.stderr
        assert "--http-max-input-size must be greater than 0" in r.stderr and "Traceback" not in r.stderr


# -- 10. error texts Triton's clients and tests match on ------------------------------------------

def test_input_size_limit_in_tritons_words(strict):
    big = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [400], "data": [1.0] * 400}]}
    status, message = error(strict, "ident_fp32", big)
    n = len(json.dumps(big).encode())
    assert status == 400 and message == (f"request JSON size of {n} bytes exceeds the maximum allowed input size of "
                                         "1024 bytes. Use --http-max-input-size to increase the limit.")
    status, message = error(strict, "ident_fp32", np.ones(400, np.float32).tobytes(),
                            {"Inference-Header-Content-Length": "0"})
    assert status == 400 and message.startswith("Raw input has a byte_size (1600 bytes) that exceeds the maximum "
                                                "allowed value of 1024 bytes.")
    c = httpclient.InferenceServerClient(strict.http_url)
    x = httpclient.InferInput("INPUT0", [400], "FP32")
    x.set_data_from_numpy(np.ones(400, np.float32))
    with pytest.raises(InferenceServerException, match="bytes exceeds the maximum allowed input size of 1024 bytes"):
        c.infer("ident_fp32", [x])
    assert c.is_server_live()


def test_json_nesting_depth_in_tritons_words(dropin):
    def nested(depth, value):
        for _ in range(depth):
            value = [value]
        return value

    for model, dt, value in (("ident_fp32", "FP32", 1.0), ("ident_strings", "BYTES", "hello")):
        ok = {"inputs": [{"name": "INPUT0", "datatype": dt, "shape": [1], "data": nested(99, value)}]}
        assert post(dropin, model, ok)[0] == 200
        for depth in (100, 120):
            deep = {"inputs": [{"name": "INPUT0", "datatype": dt, "shape": [1], "data": nested(depth, value)}]}
            assert error(dropin, model, deep) == (400, "JSON nesting depth exceeds maximum allowed limit (100)")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shm_texts_and_statuses_as_tritons(dropin, region, protocol):
    mod, c = client(dropin, protocol)
    c.unregister_system_shared_memory()
    # Triton's status (INTERNAL) and text: its gRPC client test matches "[StatusCode.INTERNAL] Unable to open ..."
    refused(lambda: c.register_system_shared_memory("test_shm", "/no_such_torpor_shm", 0), "500",
            "StatusCode.INTERNAL", "Unable to open shared memory region: '/no_such_torpor_shm'", protocol)
    key, _ = region()
    c.register_system_shared_memory("r", key, 64)
    for offset, size, text in ((64, 4, "Invalid offset for shared memory region: 'r'"),
                               (70, 4, "Invalid offset for shared memory region: 'r'"),
                               (60, 16, "Invalid offset + byte size for shared memory region: 'r'")):
        x = mod.InferInput("INPUT0", [1], "INT32")
        x.set_shared_memory("r", size, offset=offset)
        refused(lambda x=x: c.infer("slow", [x]), "400", "StatusCode.INVALID_ARGUMENT", text, protocol)
    c.unregister_system_shared_memory()


def test_restricted_api_start_up_errors_in_tritons_words(tmp_path):
    (tmp_path / "empty").mkdir()
    for flags, text in [
        (["--http-restricted-api", "bogus"],
         "--http-restricted-api option format is '<config name>:<setting>=<value>'. Got bogus"),
        (["--http-restricted-api", "foo:k=v"], "unknown restricted api 'foo'"),
        (["--grpc-restricted-protocol", "foo:k=v"], "unknown restricted protocol 'foo'"),
        (["--http-restricted-api", "health:k=v", "--http-restricted-api", "health:a=b"],
         "restricted api 'health' can not be specified in multiple config groups"),
    ]:
        r = subprocess.run([sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(tmp_path / "empty"),
                            *flags], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode != 0 and text in r.stderr, r.stderr


# -- 12. a model's failure is logged ---------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_failed_model_runs_are_logged(dropin, protocol):
    """Triton's python backend logs the error (E... pb_stub.cc "Failed to process the request(s)
    for model 'failing_0', message: ..."); so does Torpor, at the default verbosity."""
    mod, c = client(dropin, protocol)

    def logged() -> list[str]:
        return [ln for ln in dropin.log().splitlines() if "this model always fails" in ln]

    before = len(logged())
    refused(lambda: c.infer("failing", [int_input(mod)]), "500", "StatusCode.INTERNAL", "this model always fails",
            protocol)
    deadline = time.monotonic() + 5
    while len(logged()) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = logged()
    assert len(lines) > before, dropin.log()[-2000:]
    assert lines[-1].startswith("E") and "'failing'" in lines[-1]  # tritonserver's shape: E<date> ...
