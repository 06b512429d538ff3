"""The gRPC front end against the real tritonclient.grpc / grpc.aio clients and the raw stubs."""

from __future__ import annotations

import asyncio
import base64
import queue
import threading

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from ..conftest import Server, make_repo
from ..models import ALL_DATATYPES, write_test_models


@pytest.fixture(scope="module")
def dt_server(tmp_path_factory):
    """The datatype/test models plus Triton's simple models."""
    repo = write_test_models(tmp_path_factory.mktemp("grpc_dtrepo"))
    make_repo(repo, ["simple", "simple_string", "simple_sequence", "simple_dyna_sequence",
                     "simple_string_dyna_sequence", "repeat_int32"])
    s = Server(repo, "--allow-client-shm", "true").start(tmp_path_factory.mktemp("grpc_dtlogs"))
    yield s
    s.stop()


@pytest.fixture
def client(dt_server):
    c = grpcclient.InferenceServerClient(dt_server.grpc_url)
    yield c
    c.close()


@pytest.fixture
def stub(dt_server):
    channel = grpc.insecure_channel(dt_server.grpc_url)
    yield pbg.GRPCInferenceServiceStub(channel)
    channel.close()


def simple_inputs(batch: int = 1):
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.ones((batch, 16), dtype=np.int32)
    ins = [grpcclient.InferInput("INPUT0", [batch, 16], "INT32"), grpcclient.InferInput("INPUT1", [batch, 16], "INT32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return a, b, ins


def raw_simple_request(a: np.ndarray, b: np.ndarray, model: str = "simple") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="raw")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=list(a.shape))
    req.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    return req


def assert_serving(c: grpcclient.InferenceServerClient) -> None:
    a, b, ins = simple_inputs()
    r = c.infer("simple", ins)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


# -- health and metadata ---------------------------------------------------------------------

def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md.name == "triton" and md.version == "2.73.0"
    assert "system_shared_memory" in md.extensions and "statistics" in md.extensions
    assert client.get_server_metadata(as_json=True)["name"] == "triton"
    # headers become metadata and are ignored
    assert client.is_server_live(headers={"test": "1"})


def test_model_ready_is_false_not_an_error(client):
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client):
    md = client.get_model_metadata("simple")
    assert md.name == "simple" and list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert client.get_model_metadata("simple", "1", as_json=True)["versions"] == ["1"]
    cfg = client.get_model_config("simple").config
    assert cfg.name == "simple" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [16]
    assert client.get_model_config("simple", as_json=True)["config"]["input"][0]["data_type"] == "TYPE_INT32"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert e.value.message().startswith("Request for unknown model")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("simple", "7")
    assert "version 7 is not found" in e.value.message()
    assert e.value.status() == "StatusCode.NOT_FOUND"


# -- infer -----------------------------------------------------------------------------------

def test_infer_simple(client):
    a, b, ins = simple_inputs()
    outs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    r = client.infer("simple", ins, outputs=outs, request_id="42")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    resp = r.get_response()
    assert resp.id == "42" and resp.model_name == "simple" and resp.model_version == "1"
    assert len(resp.raw_output_contents) == len(resp.outputs) == 2
    assert r.get_response(as_json=True)["id"] == "42"


def test_infer_subset_of_outputs_batch_and_version(client):
    a, b, ins = simple_inputs(batch=3)
    r = client.infer("simple", ins, model_version="1", outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    resp = r.get_response()
    assert [o.name for o in resp.outputs] == ["OUTPUT1"]
    assert list(resp.outputs[0].shape) == [3, 16]
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    assert r.as_numpy("OUTPUT0") is None
    r = client.infer("simple", ins)  # no outputs: all of them
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize("dt", ALL_DATATYPES)
def test_all_datatypes_raw(client, dt):
    if dt == "BYTES":
        x = np.array([b"a", b"", b"\x00zero\x00", "ünï".encode()], dtype=np.object_)
    elif dt == "BOOL":
        x = np.array([True, False, True], dtype=np.bool_)
    elif dt == "BF16":
        x = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    else:
        info = np.iinfo if dt[0] in "IU" else np.finfo
        dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(dt) or np.dtype(dt.lower())
        lim = info(dtype)
        x = np.array([lim.min, 0, 1, lim.max], dtype=dtype)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), dt)
    inp.set_data_from_numpy(x)
    r = client.infer(f"identity_{dt.lower()}", [inp])
    out = r.as_numpy("OUTPUT0")
    assert r.get_output("OUTPUT0").datatype == dt
    if dt == "BF16":
        np.testing.assert_array_equal(out.astype(np.float32), x.astype(np.float32))
    else:
        np.testing.assert_array_equal(out, x)


async def test_aio_client_infer_and_metadata(dt_server):
    async with aiogrpcclient.InferenceServerClient(dt_server.grpc_url) as c:
        assert await c.is_server_live()
        assert await c.is_model_ready("simple")
        assert not await c.is_model_ready("nope")
        assert (await c.get_model_metadata("simple")).name == "simple"
        a, b, _ = simple_inputs()
        ins = [aiogrpcclient.InferInput("INPUT0", [1, 16], "INT32"), aiogrpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(b)
        results = await asyncio.gather(*(c.infer("simple", ins, request_id=str(i)) for i in range(20)))
        for i, r in enumerate(results):
            assert r.get_response().id == str(i)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        with pytest.raises(InferenceServerException) as e:
            await c.infer("nope", ins)
        assert e.value.status() == "StatusCode.NOT_FOUND"


def test_async_infer_callback(client):
    a, b, ins = simple_inputs()
    done: queue.Queue = queue.Queue()
    client.async_infer("simple", ins, callback=lambda result, error: done.put((result, error)), request_id="cb")
    result, error = done.get(timeout=30)
    assert error is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize("algo", ["gzip", "deflate"])
def test_compression(client, algo):
    a, b, ins = simple_inputs(batch=8)
    r = client.infer("simple", ins, compression_algorithm=algo)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


async def test_compression_aio(dt_server):
    async with aiogrpcclient.InferenceServerClient(dt_server.grpc_url) as c:
        a, b, _ = simple_inputs()
        ins = [aiogrpcclient.InferInput("INPUT0", [1, 16], "INT32"), aiogrpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(b)
        r = await c.infer("simple", ins, compression_algorithm="gzip")
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


def test_large_message_beyond_grpc_default_limit(client):
    # 2 x 8 MiB raw inputs: above grpc.aio's 4 MiB default receive limit
    x = np.arange(2 * 1024 * 1024, dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer("identity_fp32", [inp])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)


# -- typed contents --------------------------------------------------------------------------

_TYPED = {
    "BOOL": ("bool_contents", [True, False, True]),
    "INT8": ("int_contents", [-128, 0, 127]),
    "INT16": ("int_contents", [-32768, 1, 32767]),
    "INT32": ("int_contents", [-(2**31), 2, 2**31 - 1]),
    "INT64": ("int64_contents", [-(2**63), 3, 2**63 - 1]),
    "UINT8": ("uint_contents", [0, 1, 255]),
    "UINT16": ("uint_contents", [0, 1, 65535]),
    "UINT32": ("uint_contents", [0, 1, 2**32 - 1]),
    "UINT64": ("uint64_contents", [0, 1, 2**64 - 1]),
    "FP32": ("fp32_contents", [-1.5, 0.0, 3.25]),
    "FP64": ("fp64_contents", [-1.5e300, 0.0, 3.25]),
    "BYTES": ("bytes_contents", [b"x", b"", b"\x00yz"]),
}


@pytest.mark.parametrize("dt", sorted(_TYPED))
def test_typed_contents(stub, dt):
    field, values = _TYPED[dt]
    req = pb.ModelInferRequest(model_name=f"identity_{dt.lower()}")
    t = req.inputs.add(name="INPUT0", datatype=dt, shape=[len(values)])
    getattr(t.contents, field).extend(values)
    resp = stub.ModelInfer(req)
    # outputs always come back raw, aligned with `outputs`
    assert len(resp.raw_output_contents) == 1 and len(resp.outputs) == 1
    result = grpcclient.InferResult(resp).as_numpy("OUTPUT0")
    if dt == "BYTES":
        assert list(result) == values
    else:
        np.testing.assert_array_equal(result, np.array(values, dtype=result.dtype))


def test_contents_mixed_with_raw_is_refused(stub):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    req = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.contents.int_contents.extend(a.reshape(-1).tolist())
    resp = stub.ModelInfer(req)
    out = grpcclient.InferResult(resp)
    np.testing.assert_array_equal(out.as_numpy("OUTPUT0"), a + a)
    req.raw_input_contents.extend([a.tobytes()])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
        in e.value.details()
    )


def test_typed_contents_errors(stub):
    req = pb.ModelInferRequest(model_name="identity_fp16")
    t = req.inputs.add(name="INPUT0", datatype="FP16", shape=[1])
    t.contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    req = pb.ModelInferRequest(model_name="identity_int32")
    t = req.inputs.add(name="INPUT0", datatype="INT32", shape=[3])
    t.contents.int_contents.extend([1, 2])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected number of elements 2" in e.value.details()


# -- bad input -------------------------------------------------------------------------------

def test_bad_input_errors_and_server_keeps_serving(client, stub):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    cases = []
    # wrong raw size
    req = raw_simple_request(a, a)
    req.raw_input_contents[1] = a.tobytes()[:-4]
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "unexpected total byte size 60 for input 'INPUT1', expecting 64"))
    # unknown datatype
    req = raw_simple_request(a, a)
    req.inputs[0].datatype = "INT33"
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "invalid datatype 'INT33'"))
    # datatype the model does not take
    req = raw_simple_request(a.astype(np.int64), a.astype(np.int64))
    for t in req.inputs:
        t.datatype = "INT64"
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "data-type is 'INT64', but model 'simple' expects 'INT32'"))
    # too many / too few raw contents
    req = raw_simple_request(a, a)
    req.raw_input_contents.append(b"extra")
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"))
    req = raw_simple_request(a, a)
    del req.raw_input_contents[1]
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"))
    # wrong shape, negative dims, unknown model, unknown output, malformed BYTES
    req = raw_simple_request(a.reshape(16), a.reshape(16))
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'INPUT0'"))
    req = raw_simple_request(a, a)
    req.inputs[0].shape[:] = [-1, 16]
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "must not be negative"))
    cases.append((raw_simple_request(a, a, model="nope"), grpc.StatusCode.NOT_FOUND, "Request for unknown model"))
    req = raw_simple_request(a, a)
    req.outputs.add(name="OUTPUT9")
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference output 'OUTPUT9'"))
    req = pb.ModelInferRequest(model_name="identity_bytes")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(b"\xff\x00\x00\x00ab")
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "malformed BYTES tensor"))
    # reserved parameter
    req = raw_simple_request(a, a)
    req.parameters["triton_secret"].bool_param = True
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "reserved"))
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == code, (text, e.value.details())
        assert text in e.value.details(), e.value.details()
        assert_serving(client)


def test_decoupled_model_refused_by_model_infer(client):
    ins = [grpcclient.InferInput("IN", [2], "INT32"), grpcclient.InferInput("DELAY", [2], "UINT32"),
           grpcclient.InferInput("WAIT", [1], "UINT32")]
    ins[0].set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    ins[1].set_data_from_numpy(np.zeros(2, dtype=np.uint32))
    ins[2].set_data_from_numpy(np.zeros(1, dtype=np.uint32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("repeat_int32", ins)
    assert e.value.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"


def test_model_failure_is_internal(client):
    inp = grpcclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("failing", [inp])
    assert "this model always fails" in e.value.message()
    assert e.value.status() == "StatusCode.INTERNAL"
    assert_serving(client)


# -- parameters, sequences, classification ---------------------------------------------------

def test_custom_parameters_reach_the_model(client):
    inp = grpcclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    r = client.infer("params", [inp], priority=1, timeout=1000000,
                     parameters={"s": "text", "i": 7, "b": True, "d": 0.5})
    import json

    got = json.loads(r.as_numpy("OUTPUT0")[0])
    assert got == {"s": "text", "i": 7, "b": True, "d": 0.5}


def test_sequence_id_int(client):
    outs = []
    for i, (start, end) in enumerate([(True, False), (False, False), (False, True)]):
        inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
        inp.set_data_from_numpy(np.array([[i + 1]], dtype=np.int32))
        r = client.infer("simple_sequence", [inp], sequence_id=1234, sequence_start=start, sequence_end=end)
        outs.append(int(r.as_numpy("OUTPUT")[0][0]))
    assert outs == [2, 2, 3]  # simple_sequence: (IN + START) * READY


def test_sequence_id_string(client):
    # simple_string_dyna_sequence accumulates per string CORRID; END adds int(CORRID)
    outs = []
    for i, (start, end) in enumerate([(True, False), (False, False), (False, True)]):
        inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
        inp.set_data_from_numpy(np.array([[i + 1]], dtype=np.int32))
        r = client.infer("simple_string_dyna_sequence", [inp], sequence_id="1000", sequence_start=start,
                         sequence_end=end)
        outs.append(int(r.as_numpy("OUTPUT")[0][0]))
    assert outs == [1, 3, 6 + 1000]


def test_sequence_without_start_is_refused(client):
    inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple_sequence", [inp], sequence_id=999)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "START" in e.value.message()


def test_classification(client):
    x = np.array([[0.1, 3.0, 2.0, -1.0, 0.5]], dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 5], "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer("classifier", [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)])
    out = r.as_numpy("OUTPUT0")
    assert r.get_output("OUTPUT0").datatype == "BYTES"
    assert [v.decode() for v in out[0]] == ["4.500000:1:dog", "3.000000:2:bird"]


# -- streaming -------------------------------------------------------------------------------

def repeat_inputs(values, delays=None, wait=0, cls=grpcclient):
    n = len(values)
    ins = [cls.InferInput("IN", [n], "INT32"), cls.InferInput("DELAY", [n], "UINT32"),
           cls.InferInput("WAIT", [1], "UINT32")]
    ins[0].set_data_from_numpy(np.array(values, dtype=np.int32))
    ins[1].set_data_from_numpy(np.array(delays or [0] * n, dtype=np.uint32))
    ins[2].set_data_from_numpy(np.array([wait], dtype=np.uint32))
    return ins


class StreamCollector:
    def __init__(self):
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error):
        self.items.put((result, error))

    def take(self, n: int, timeout: float = 30.0):
        return [self.items.get(timeout=timeout) for _ in range(n)]

    def empty_after(self, seconds: float) -> bool:
        try:
            self.items.get(timeout=seconds)
            return False
        except queue.Empty:
            return True


def test_stream_decoupled_repeat(client):
    got = StreamCollector()
    client.start_stream(callback=got)
    try:
        client.async_stream_infer("repeat_int32", repeat_inputs([4, 5, 6], [10, 10, 10]), request_id="r1")
        items = got.take(3)
        assert all(e is None for _, e in items)
        assert [int(r.as_numpy("OUT")[0]) for r, _ in items] == [4, 5, 6]
        assert [int(r.as_numpy("IDX")[0]) for r, _ in items] == [0, 1, 2]
        for r, _ in items:
            resp = r.get_response()
            assert resp.id == "r1"
            assert resp.parameters["triton_final_response"].bool_param is False
        # the final flag comes without outputs: not sent unless asked for
        assert got.empty_after(0.5)
        # zero responses for an empty IN, and with enable_empty_final_response the empty final
        client.async_stream_infer("repeat_int32", repeat_inputs([]), request_id="r2",
                                  enable_empty_final_response=True)
        (r, e), = got.take(1)
        assert e is None
        resp = r.get_response()
        assert resp.id == "r2" and len(resp.outputs) == 0
        assert resp.parameters["triton_final_response"].bool_param is True
        client.async_stream_infer("repeat_int32", repeat_inputs([7], [0]), request_id="r3",
                                  enable_empty_final_response=True)
        items = got.take(2)
        assert [len(r.get_response().outputs) for r, _ in items] == [2, 0]
        assert [r.get_response().parameters["triton_final_response"].bool_param for r, _ in items] == [False, True]
    finally:
        client.stop_stream()


def test_stream_errors_do_not_end_the_stream(client):
    got = StreamCollector()
    client.start_stream(callback=got)
    try:
        a, b, ins = simple_inputs()
        client.async_stream_infer("nope", ins, request_id="bad1")
        (r, e), = got.take(1)
        assert r is None and "Request for unknown model" in e.message()
        bad = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        bad.set_data_from_numpy(a)
        client.async_stream_infer("simple", [bad], request_id="bad2")  # INPUT1 missing
        (r, e), = got.take(1)
        assert r is None and "missing required input" in e.message()
        # a non-decoupled model over the stream: one response, marked final
        client.async_stream_infer("simple", ins, request_id="good")
        (r, e), = got.take(1)
        assert e is None
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        assert r.get_response().id == "good"
        assert r.get_response().parameters["triton_final_response"].bool_param is True
    finally:
        client.stop_stream()


def test_stream_sequence_in_order(client):
    got = StreamCollector()
    client.start_stream(callback=got)
    try:
        for i in range(6):
            inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
            inp.set_data_from_numpy(np.array([[i]], dtype=np.int32))
            client.async_stream_infer("simple_dyna_sequence", [inp], request_id=str(i), sequence_id=77,
                                      sequence_start=i == 0, sequence_end=i == 5)
        items = got.take(6)
        assert all(e is None for _, e in items)
        by_id = {r.get_response().id: int(r.as_numpy("OUTPUT")[0][0]) for r, _ in items}
        # OUT = (IN + START + END * CORRID) * READY
        assert by_id == {"0": 1, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5 + 77}
    finally:
        client.stop_stream()


async def test_stream_aio_concurrent_requests(dt_server):
    async with aiogrpcclient.InferenceServerClient(dt_server.grpc_url) as c:
        async def requests():
            for k in range(3):
                yield {"model_name": "repeat_int32", "inputs": repeat_inputs([k * 10, k * 10 + 1], [5, 5], cls=aiogrpcclient),
                       "request_id": f"q{k}"}
            a, b, _ = simple_inputs()
            ins = [aiogrpcclient.InferInput("INPUT0", [1, 16], "INT32"), aiogrpcclient.InferInput("INPUT1", [1, 16], "INT32")]
            ins[0].set_data_from_numpy(a)
            ins[1].set_data_from_numpy(b)
            yield {"model_name": "simple", "inputs": ins, "request_id": "s"}
            yield {"model_name": "nope", "inputs": ins, "request_id": "x"}

        seen: dict[str, list[int]] = {}
        errors = []
        async for result, error in c.stream_infer(requests()):
            if error is not None:
                errors.append(error.message())
                continue
            rid = result.get_response().id
            if rid == "s":
                seen.setdefault(rid, []).append(int(result.as_numpy("OUTPUT0")[0][0]))
            else:
                seen.setdefault(rid, []).append(int(result.as_numpy("OUT")[0]))
        assert seen == {"q0": [0, 1], "q1": [10, 11], "q2": [20, 21], "s": [1]}
        assert len(errors) == 1 and "Request for unknown model" in errors[0]


async def test_stream_aio_every_response_arrives(dt_server):
    """Regression: requests finishing while the stream winds down must still be answered."""
    async with aiogrpcclient.InferenceServerClient(dt_server.grpc_url) as c:
        for round_ in range(10):
            async def requests():
                for step in range(8):
                    for seq in (f"{round_}-a", 5000 + round_, f"{round_}-b"):
                        inp = aiogrpcclient.InferInput("INPUT", [1, 1], "INT32")
                        inp.set_data_from_numpy(np.array([[step]], dtype=np.int32))
                        yield {"model_name": "simple_sequence", "inputs": [inp], "request_id": f"{seq}_{step}",
                               "sequence_id": seq, "sequence_start": step == 0, "sequence_end": step == 7}

            ids = []
            async for result, error in c.stream_infer(requests()):
                assert error is None, error
                ids.append(result.get_response().id)
            assert len(ids) == 24 and len(set(ids)) == 24


# -- statistics, repository, trace, logging --------------------------------------------------

def test_statistics(client):
    before = client.get_inference_statistics("simple", as_json=True)["model_stats"][0]
    for _ in range(3):
        assert_serving(client)
    st = client.get_inference_statistics("simple").model_stats
    assert len(st) == 1 and st[0].name == "simple" and st[0].version == "1"
    assert st[0].inference_stats.success.count == int(before["inference_stats"]["success"].get("count", 0)) + 3
    assert st[0].inference_count >= 3 and st[0].execution_count >= 3
    everything = client.get_inference_statistics().model_stats
    assert {s.name for s in everything} >= {"simple", "identity_int32"}
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_and_control_refused_in_none_mode(client):
    index = client.get_model_repository_index().models
    names = [m.name for m in index]
    assert names == sorted(names) and "simple" in names
    simple = [m for m in index if m.name == "simple"][0]
    assert simple.version == "1" and simple.state == "READY"
    assert client.get_model_repository_index(as_json=True)["models"]
    with pytest.raises(InferenceServerException) as e:
        client.load_model("simple")
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert "explicit model load / unload is not allowed" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("simple")
    assert e.value.status() == "StatusCode.UNAVAILABLE"


def test_repository_control_explicit_mode(start_server, tmp_path):
    repo = make_repo(tmp_path / "repo", ["simple", "simple_string"])
    s = start_server(repo, "--model-control-mode", "explicit", "--load-model", "simple_string",
                     "--allow-override-code", "true")  # it uploads a python model's code in file: contents
    c = grpcclient.InferenceServerClient(s.grpc_url)
    index = {m.name: m for m in c.get_model_repository_index().models}
    assert index["simple"].state == "" and index["simple_string"].state == "READY"
    assert not c.is_model_ready("simple")
    c.load_model("simple")
    assert c.is_model_ready("simple")
    assert_serving(c)
    c.load_model("simple", config='{"max_batch_size":"16"}')
    assert c.get_model_config("simple").config.max_batch_size == 16
    with pytest.raises(InferenceServerException) as e:
        c.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert "failed to load" in e.value.message()
    assert c.is_model_ready("simple")  # a failed reload keeps the old version serving
    c.unload_model("simple")
    assert not c.is_model_ready("simple")
    index = {(m.name, m.version): m for m in c.get_model_repository_index().models}
    assert index[("simple", "1")].state == "UNAVAILABLE" and index[("simple", "1")].reason == "unloaded"
    with grpc.insecure_channel(s.grpc_url) as channel:
        ready = pbg.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [m.name for m in ready.models] == ["simple_string"]
    # file: overrides are raw bytes over gRPC
    code = (repo / "simple" / "1" / "model.py").read_bytes()
    config = (repo / "simple" / "config.pbtxt").read_text()
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(config, model_config_pb2.ModelConfig())
    cfg.name = "simple_copy"
    c.load_model("simple_copy", config=json_format.MessageToJson(cfg), files={"file:1/model.py": code})
    a, b, ins = simple_inputs()
    np.testing.assert_array_equal(c.infer("simple_copy", ins).as_numpy("OUTPUT0"), a + b)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("simple", config="{}", files={"file:" + "A" * 256: b"a"})
    assert e.value.status() == "StatusCode.INTERNAL"
    assert "failed to poll from model repository" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.load_model("wrong_model_name")
    assert "failed to load" in e.value.message()
    assert c.is_server_live()
    c.close()


def test_trace_settings(client):
    ts = client.get_trace_settings(as_json=True)["settings"]
    assert ts["trace_level"]["value"] == ["OFF"] and ts["trace_rate"]["value"] == ["1000"]
    r = client.update_trace_settings(settings={"trace_rate": "5"}, as_json=True)
    assert r["settings"]["trace_rate"]["value"] == ["5"]
    assert r["settings"]["trace_level"]["value"] == ["OFF"]
    with pytest.raises(InferenceServerException) as e:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})  # no --trace-config triton,file
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "trace file name is not given" in e.value.message()
    r = client.update_trace_settings("simple", settings={"trace_count": "3"}, as_json=True)
    assert r["settings"]["trace_count"]["value"] == ["3"]
    r = client.update_trace_settings("simple", settings={"trace_count": None}, as_json=True)
    assert r["settings"]["trace_count"]["value"] == ["-1"]
    client.update_trace_settings(settings={"trace_rate": "1000", "trace_level": ["OFF"]})
    with pytest.raises(InferenceServerException) as e:
        client.update_trace_settings(settings={"trace_file": "x.log"})
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as e:
        client.get_trace_settings("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_log_settings(client):
    ls = client.get_log_settings(as_json=True)["settings"]
    assert ls["log_info"]["bool_param"] is True and ls["log_format"]["string_param"] == "default"
    r = client.update_log_settings({"log_verbose_level": 1, "log_warning": False}, as_json=True)["settings"]
    assert r["log_verbose_level"]["uint32_param"] == 1 and r["log_warning"]["bool_param"] is False
    r = client.update_log_settings({"log_verbose_level": 0, "log_warning": True}, as_json=True)["settings"]
    assert r["log_verbose_level"].get("uint32_param", 0) == 0
    with pytest.raises(InferenceServerException) as e:
        client.update_log_settings({"log_file": "/tmp/x.log"})
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as e:
        client.update_log_settings({"log_format": "fancy"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


# -- CUDA shared memory without CUDA ---------------------------------------------------------

def test_cuda_shm_register_gives_clear_error_without_cuda(client):
    from torpor.dataplane import cudashm

    try:
        cudashm._Driver.get()
        pytest.skip("a CUDA driver is present: covered by tests/gpu/test_cuda_shm.py")
    except Exception:  # noqa: BLE001
        pass
    with pytest.raises(InferenceServerException) as e:
        # the client base64-decodes the handle it is given (cudashm.get_raw_handle's form)
        client.register_cuda_shared_memory("cuda_region", base64.b64encode(b"\x01" * 64), 0, 64)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "CUDA shared memory is not available" in e.value.message()
    assert len(client.get_cuda_shared_memory_status().regions) == 0
    client.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException) as e:
        client.get_cuda_shared_memory_status("cuda_region")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    # a handle of the wrong size is the client's mistake wherever CUDA is
    with pytest.raises(InferenceServerException) as e:
        client.register_cuda_shared_memory("cuda_region", base64.b64encode(b"\x01" * 10), 0, 64)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert_serving(client)


def test_stream_many_concurrent_infers_threaded(dt_server):
    """Several threads each with their own client and stream; every request gets its answer."""
    errors = []

    def worker(k: int):
        c = grpcclient.InferenceServerClient(dt_server.grpc_url)
        got = StreamCollector()
        c.start_stream(callback=got)
        try:
            a, b, ins = simple_inputs()
            for i in range(20):
                c.async_stream_infer("simple", ins, request_id=f"{k}-{i}")
            ids = sorted(r.get_response().id for r, e in got.take(20) if e is None)
            if ids != sorted(f"{k}-{i}" for i in range(20)):
                errors.append(ids)
        finally:
            c.stop_stream()
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_every_datatype_model_is_served(client):
    # guards the datatype matrix above against a model silently failing to load
    for dt in ALL_DATATYPES:
        assert client.is_model_ready(f"identity_{dt.lower()}")
