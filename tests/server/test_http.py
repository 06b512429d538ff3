"""The HTTP front end against the real tritonclient.http / http.aio clients and raw requests."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
import zlib

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from ..conftest import Server, make_repo
from ..models import ALL_DATATYPES, write_test_models


@pytest.fixture(scope="session")
def dt_server(tmp_path_factory):
    """A server over the datatype/test models plus `simple`."""
    repo = write_test_models(tmp_path_factory.mktemp("dtrepo"))
    make_repo(repo, ["simple", "simple_string", "repeat_int32"])
    s = Server(repo).start(tmp_path_factory.mktemp("dtlogs"))
    yield s
    s.stop()


def raw(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of a raw HTTP request, like curl."""
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def simple_inputs(binary: bool = True, batch: int = 1):
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    b = np.ones((batch, 16), dtype=np.int32)
    ins = [httpclient.InferInput("INPUT0", [batch, 16], "INT32"), httpclient.InferInput("INPUT1", [batch, 16], "INT32")]
    ins[0].set_data_from_numpy(a, binary_data=binary)
    ins[1].set_data_from_numpy(b, binary_data=binary)
    return a, b, ins


# -- health and metadata ---------------------------------------------------------------------

def test_health_and_server_metadata(server):
    c = httpclient.InferenceServerClient(server.http_url)
    assert c.is_server_live()
    assert c.is_server_ready()
    md = c.get_server_metadata()
    assert md["name"] == "triton"
    assert "binary_tensor_data" in md["extensions"]
    # query strings and unknown headers are ignored, as the example clients send them
    assert c.is_server_live(query_params={"test_1": 1, "test_2": 2}, headers={"test": "1"})
    # KServe's client reads {"live": true}; tritonclient looks at the status only
    status, _, body = raw(server, "GET", "/v2/health/live")
    assert status == 200 and json.loads(body) == {"live": True}


def test_model_metadata_config_and_ready(server):
    c = httpclient.InferenceServerClient(server.http_url)
    assert c.is_model_ready("simple")
    assert c.is_model_ready("simple", "1")
    assert not c.is_model_ready("simple", "2")
    assert not c.is_model_ready("no_such_model")
    md = c.get_model_metadata("simple")
    assert md["name"] == "simple" and md["versions"] == ["1"]
    assert md["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    cfg = c.get_model_config("simple")
    assert cfg["name"] == "simple"
    assert cfg["max_batch_size"] == 8
    assert cfg["input"][0]["dims"] == [16] and cfg["input"][0]["data_type"] == "TYPE_INT32"
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("no_such_model")
    assert str(e.value.message()).startswith("Request for unknown model")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("simple", "7")
    assert "version 7 is not found" in e.value.message()


def test_routes_not_found_and_method(server):
    status, _, body = raw(server, "GET", "/v2/nothing/here")
    assert status == 404 and json.loads(body) == {"error": "Not Found"}
    status, _, body = raw(server, "GET", "/v2/models/simple/infer")
    assert status == 405 and json.loads(body) == {"error": "Method Not Allowed"}
    status, _, body = raw(server, "GET", "/v2/models/simple/versions/abc")
    assert status == 404


# -- infer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_simple(server, binary_in, binary_out):
    c = httpclient.InferenceServerClient(server.http_url)
    a, b, ins = simple_inputs(binary_in)
    outs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out),
            httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary_out)]
    r = c.infer("simple", ins, outputs=outs, request_id="42")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    resp = r.get_response()
    assert resp["id"] == "42" and resp["model_name"] == "simple" and resp["model_version"] == "1"


def test_infer_all_outputs_batch_and_version(server):
    c = httpclient.InferenceServerClient(server.http_url)
    a, b, ins = simple_inputs(True, batch=3)
    r = c.infer("simple", ins, model_version="1")  # outputs=None -> binary_data_output
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    r = c.infer("simple", ins, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert r.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("algo", ["gzip", "deflate"])
def test_compression(server, algo):
    c = httpclient.InferenceServerClient(server.http_url)
    a, b, ins = simple_inputs(True, batch=8)  # a response over 500 bytes, so it is compressed
    r = c.infer("simple", ins, request_compression_algorithm=algo, response_compression_algorithm=algo)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


async def test_aio_client(server):
    c = aiohttpclient.InferenceServerClient(server.http_url)
    try:
        assert await c.is_server_live()
        assert await c.is_server_ready()
        assert await c.is_model_ready("simple")
        assert (await c.get_server_metadata())["name"] == "triton"
        a, b, _ = simple_inputs()
        ins = [aiohttpclient.InferInput("INPUT0", [1, 16], "INT32"), aiohttpclient.InferInput("INPUT1", [1, 16], "INT32")]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(b, binary_data=False)
        r = await c.infer("simple", ins)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        stats = await c.get_inference_statistics("simple")
        assert len(stats["model_stats"]) == 1
        with pytest.raises(InferenceServerException, match="Request for unknown model"):
            await c.infer("nope", ins)
    finally:
        await c.close()


def test_async_infer(server):
    c = httpclient.InferenceServerClient(server.http_url, concurrency=4)
    a, b, ins = simple_inputs()
    handles = [c.async_infer("simple", ins) for _ in range(8)]
    for h in handles:
        np.testing.assert_array_equal(h.get_result().as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize("dt", ALL_DATATYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype(dt_server, dt, binary):
    c = httpclient.InferenceServerClient(dt_server.http_url)
    rng = np.random.default_rng(0)
    if dt == "BYTES":
        x = np.array([b"a", b"", "ünï".encode(), b"x\x00y"] if binary else [b"a", b"", "ünï".encode(), b"z"], dtype=np.object_)
    elif dt == "BOOL":
        x = np.array([True, False, True])
    elif dt == "BF16":
        x = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
    else:
        from torpor.datatypes import NUMPY_DTYPES

        x = (rng.random(5) * 100).astype(NUMPY_DTYPES[dt])
    inp = httpclient.InferInput("INPUT0", list(x.shape), dt)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    model = f"identity_{dt.lower()}"
    if not binary and dt in ("FP16", "BF16"):
        # JSON cannot carry half-precision tensors: the client refuses BF16, the server FP16
        if dt == "BF16":
            with pytest.raises(InferenceServerException):
                inp.set_data_from_numpy(x, binary_data=False)
            return
        inp.set_data_from_numpy(x, binary_data=False)
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, [inp], outputs=[out])
        assert e.value.status() == "400"
        return
    inp.set_data_from_numpy(x, binary_data=binary)
    r = c.infer(model, [inp], outputs=[out])
    y = r.as_numpy("OUTPUT0")
    if dt == "BYTES":  # JSON outputs come back as str, binary ones as bytes
        assert [v.encode() if isinstance(v, str) else v for v in y] == list(x)
    else:
        np.testing.assert_array_equal(y.view(np.uint16) if dt == "BF16" else y,
                                      x.view(np.uint16) if dt == "BF16" else x)


def test_strings(dt_server):
    c = httpclient.InferenceServerClient(dt_server.http_url)
    a = np.array([str(i) for i in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array(["1"] * 16, dtype=np.object_).reshape(1, 16)
    for binary in (True, False):
        ins = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
        ins[0].set_data_from_numpy(a, binary_data=binary)
        ins[1].set_data_from_numpy(b, binary_data=binary)
        r = c.infer("simple_string", ins, outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        assert [int(v) for v in r.as_numpy("OUTPUT0").reshape(-1)] == [i + 1 for i in range(16)]


def test_parameters_reach_the_model(dt_server):
    c = httpclient.InferenceServerClient(dt_server.http_url)
    inp = httpclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    r = c.infer("params", [inp], parameters={"my_str": "hello", "my_int": 3, "my_bool": True})
    got = json.loads(r.as_numpy("OUTPUT0")[0])
    assert got["my_str"] == "hello" and got["my_int"] == 3 and got["my_bool"] is True
    with pytest.raises(InferenceServerException):
        c.infer("params", [inp], parameters={"triton_x": 1})  # client refuses reserved keys
    status, _, body = raw(dt_server, "POST", "/v2/models/params/infer",
                          json.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [1]}],
                                      "parameters": {"triton_x": 1}}).encode())
    assert status == 400 and "triton_" in json.loads(body)["error"]


def test_classification(dt_server):
    c = httpclient.InferenceServerClient(dt_server.http_url)
    x = np.array([[0.1, 0.9, 0.5, 0.2, 0.3], [5, 4, 3, 2, 1]], dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", [2, 5], "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer("classifier", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0", class_count=2)])
    y = r.as_numpy("OUTPUT0")
    assert y.shape == (2, 2)
    assert y[0][0].decode() == f"{0.9 * 1.5:f}:1:dog"
    assert y[1][1].decode() == f"{4 * 1.5:f}:1:dog"
    assert y[1][0].decode().endswith(":0:cat")


def test_failing_model_is_a_clean_error(dt_server):
    c = httpclient.InferenceServerClient(dt_server.http_url)
    inp = httpclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="always fails"):
        c.infer("failing", [inp])
    assert c.is_server_live()
    stats = c.get_inference_statistics("failing")["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] >= 1


def test_decoupled_model_refused_over_http(dt_server):
    c = httpclient.InferenceServerClient(dt_server.http_url)
    inp = httpclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="decoupled transaction policy") as e:
        c.infer("repeat_int32", [inp])
    assert e.value.status() == "501"


def test_sequence_models(server):
    c = httpclient.InferenceServerClient(server.http_url)

    def send(model, value, seq, start=False, end=False):
        ins = [httpclient.InferInput("INPUT", [1, 1], "INT32")]
        ins[0].set_data_from_numpy(np.array([[value]], dtype=np.int32))
        r = c.infer(model, ins, sequence_id=seq, sequence_start=start, sequence_end=end)
        return int(r.as_numpy("OUTPUT")[0][0])

    assert send("simple_sequence", 0, 7, start=True) == 1
    assert send("simple_sequence", 5, 7) == 5
    assert send("simple_sequence", -3, "a-string-id", start=True) == -2
    assert send("simple_dyna_sequence", 0, 1000, start=True) == 1
    assert send("simple_dyna_sequence", 4, 1000) == 4
    assert send("simple_dyna_sequence", 1, 1000, end=True) == 1 + 1000
    with pytest.raises(InferenceServerException, match="correlation ID"):
        send("simple_sequence", 1, 0)
    with pytest.raises(InferenceServerException, match="START flag"):
        send("simple_dyna_sequence", 1, 123456)


def test_statistics(server):
    c = httpclient.InferenceServerClient(server.http_url)
    before = c.get_inference_statistics("simple")["model_stats"][0]
    _, _, ins = simple_inputs(batch=2)
    for _ in range(3):
        c.infer("simple", ins)
    after = c.get_inference_statistics("simple")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] == 3
    assert any(b["batch_size"] == 2 for b in after["batch_stats"])
    assert after["last_inference"] > 0
    everything = c.get_inference_statistics()["model_stats"]
    assert {"simple", "simple_string"} <= {m["name"] for m in everything}
    with pytest.raises(InferenceServerException, match="Request for unknown model"):
        c.get_inference_statistics("nope")


# -- repository ------------------------------------------------------------------------------

def test_repository_index_and_none_mode(server):
    c = httpclient.InferenceServerClient(server.http_url)
    index = c.get_model_repository_index()
    assert len(index) == 7
    assert [m["name"] for m in index] == sorted(m["name"] for m in index)
    assert all(m["state"] == "READY" and m["version"] == "1" for m in index)
    with pytest.raises(InferenceServerException, match="polling is enabled") as e:
        c.load_model("simple")
    assert e.value.status() == "503"
    status, _, body = raw(server, "POST", "/v2/repository/index", json.dumps({"ready": True}).encode())
    assert status == 200 and len(json.loads(body)) == 7


def test_explicit_mode_load_unload(start_server, simple_repo):
    # this test uploads a python-backend model's code through file: contents
    s = start_server(simple_repo, "--model-control-mode", "explicit", "--load-model", "simple",
                     "--allow-override-code", "true")
    c = httpclient.InferenceServerClient(s.http_url)
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert index["simple"]["state"] == "READY"
    assert index["simple_string"] == {"name": "simple_string"}
    c.load_model("simple_string")
    assert c.is_model_ready("simple_string")
    c.unload_model("simple_string")
    assert not c.is_model_ready("simple_string")
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert index["simple_string"]["state"] == "UNAVAILABLE" and index["simple_string"]["reason"] == "unloaded"
    # config override (an int given as a string, as the example client sends it); the fields it
    # leaves out are completed from the model's own config.pbtxt
    with pytest.raises(InferenceServerException, match="failed to load"):
        c.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert c.is_model_ready("simple")
    c.load_model("simple", config='{"max_batch_size":"16"}')
    assert c.get_model_config("simple")["max_batch_size"] == 16
    with pytest.raises(InferenceServerException, match="failed to load") as e:
        c.load_model("no_such_model")
    assert e.value.status() == "500"
    # a model loaded from `file:` contents (base64 over HTTP), named differently from any folder
    code = (simple_repo / "simple" / "1" / "model.py").read_bytes()
    cfg = (simple_repo / "simple" / "config.pbtxt").read_text().replace('name: "simple"', 'name: "uploaded"')
    from torpor.config import config_to_dict, parse_config_text

    c.load_model("uploaded", config=json.dumps(config_to_dict(parse_config_text(cfg))), files={"file:1/model.py": code})
    a, b, ins = simple_inputs()
    np.testing.assert_array_equal(c.infer("uploaded", ins).as_numpy("OUTPUT0"), a + b)
    # a failed reload keeps the previous version serving
    with pytest.raises(InferenceServerException, match="failed to load"):
        c.load_model("uploaded", config=json.dumps(config_to_dict(parse_config_text(cfg))),
                     files={"file:1/model.py": b"raise RuntimeError('broken')"})
    np.testing.assert_array_equal(c.infer("uploaded", ins).as_numpy("OUTPUT0"), a + b)
    assert c.is_server_live()


def test_repository_name_unsupported(server):
    status, _, body = raw(server, "POST", "/v2/repository/myrepo/models/simple/load", b"")
    assert status == 501 and "repository_name" in json.loads(body)["error"]


# -- trace and logging -----------------------------------------------------------------------

def test_trace_settings(server):
    c = httpclient.InferenceServerClient(server.http_url)
    t = c.get_trace_settings()
    assert t["trace_level"] == ["OFF"] and t["trace_rate"] == "1000" and t["trace_mode"] == "triton"
    t = c.update_trace_settings(settings={"trace_rate": "5"})
    assert t["trace_rate"] == "5" and t["trace_level"] == ["OFF"]
    with pytest.raises(InferenceServerException, match="trace file name is not given"):
        c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})  # no --trace-config triton,file
    m = c.update_trace_settings("simple", settings={"trace_count": "10"})
    assert m["trace_count"] == "10" and m["trace_rate"] == "5"
    m = c.update_trace_settings("simple", settings={"trace_count": None})
    assert m["trace_count"] == "-1"
    assert c.get_trace_settings()["trace_count"] == "-1"
    c.update_trace_settings(settings={"trace_rate": "1000", "trace_level": ["OFF"]})
    with pytest.raises(InferenceServerException):
        c.update_trace_settings(settings={"trace_file": "x.log"})


def test_log_settings(server):
    c = httpclient.InferenceServerClient(server.http_url)
    s = c.get_log_settings()
    assert s == {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                 "log_verbose_level": 0, "log_format": "default"}
    s = c.update_log_settings({"log_verbose_level": 1, "log_info": False})
    assert s["log_verbose_level"] == 1 and s["log_info"] is False and s["log_error"] is True
    c.update_log_settings({"log_verbose_level": 0, "log_info": True})
    with pytest.raises(InferenceServerException):
        c.update_log_settings({"log_file": "/tmp/x"})


# -- bad input: every one is a 4xx with {"error"} and the server keeps serving ----------------

def _infer_body(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode()


GOOD_INPUTS = [
    {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
    {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
]

BAD_REQUESTS = {
    "malformed json": (b'{"inputs": [', {}, 400, "parse"),
    "not an object": (b"[1,2]", {}, 400, "object"),
    "no inputs": (b"{}", {}, 400, "inputs"),
    "wrong datatype": (_infer_body([{**GOOD_INPUTS[0], "datatype": "FP32", "data": [1.0] * 16}, GOOD_INPUTS[1]]), {}, 400, "data-type"),
    "unknown datatype": (_infer_body([{**GOOD_INPUTS[0], "datatype": "INT3"}, GOOD_INPUTS[1]]), {}, 400, "datatype"),
    "wrong shape": (_infer_body([{**GOOD_INPUTS[0], "shape": [1, 15], "data": list(range(15))}, GOOD_INPUTS[1]]), {}, 400, "shape"),
    "element count": (_infer_body([{**GOOD_INPUTS[0], "data": list(range(15))}, GOOD_INPUTS[1]]), {}, 400, "elements"),
    "missing input": (_infer_body([GOOD_INPUTS[0]]), {}, 400, "missing required input"),
    "extra input": (_infer_body([*GOOD_INPUTS, {**GOOD_INPUTS[0], "name": "INPUT9"}]), {}, 400, "unexpected inference input"),
    "unknown output": (_infer_body(GOOD_INPUTS, outputs=[{"name": "NOPE"}]), {}, 400, "unexpected inference output"),
    "batch too large": (_infer_body([{**GOOD_INPUTS[0], "shape": [9, 16], "data": [0] * 144},
                                      {**GOOD_INPUTS[1], "shape": [9, 16], "data": [0] * 144}]), {}, 400, "batch-size"),
    "string data for int": (_infer_body([{**GOOD_INPUTS[0], "data": ["x"] * 16}, GOOD_INPUTS[1]]), {}, 400, "INT32"),
    "negative shape": (_infer_body([{**GOOD_INPUTS[0], "shape": [-1, 16]}, GOOD_INPUTS[1]]), {}, 400, "negative"),
    "bad compression": (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, "decompress"),
    "unknown compression": (b"xx", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    "bad header length": (_infer_body(GOOD_INPUTS), {"Inference-Header-Content-Length": "100000"}, 400, "header"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests(server, case):
    body, headers, code, fragment = BAD_REQUESTS[case]
    status, _, out = raw(server, "POST", "/v2/models/simple/infer", body, headers)
    assert status == code, out
    err = json.loads(out)["error"]
    assert fragment.lower() in err.lower(), err
    assert raw(server, "GET", "/v2/health/live")[0] == 200


def test_binary_length_mismatch(server):
    a = np.arange(16, dtype=np.int32).tobytes()
    header = {"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
    ]}
    h = json.dumps(header).encode()
    for body in (h + a, h + a + a + b"extra", h + a + a[:-4] + a):  # missing, left over, wrong split
        status, _, out = raw(server, "POST", "/v2/models/simple/infer", body,
                             {"Inference-Header-Content-Length": str(len(h))})
        assert status == 400, out
        assert "error" in json.loads(out)
    bad_size = dict(header)
    bad_size["inputs"] = [dict(header["inputs"][0], parameters={"binary_data_size": 60}), header["inputs"][1]]
    h2 = json.dumps(bad_size).encode()
    status, _, out = raw(server, "POST", "/v2/models/simple/infer", h2 + a[:60] + a,
                         {"Inference-Header-Content-Length": str(len(h2))})
    assert status == 400 and "expecting 64" in json.loads(out)["error"]


def test_unknown_model_and_version(server):
    status, _, out = raw(server, "POST", "/v2/models/nope/infer", _infer_body(GOOD_INPUTS))
    assert status == 404 and json.loads(out)["error"].startswith("Request for unknown model")
    status, _, out = raw(server, "POST", "/v2/models/simple/versions/3/infer", _infer_body(GOOD_INPUTS))
    assert status == 404 and json.loads(out)["error"].startswith("Request for unknown model")


def test_oversized_body(start_server, simple_repo):
    s = start_server(simple_repo, "--http-max-input-size", "1024")
    c = httpclient.InferenceServerClient(s.http_url)
    x = np.zeros((8, 16), dtype=np.int32)
    ins = [httpclient.InferInput("INPUT0", [8, 16], "INT32"), httpclient.InferInput("INPUT1", [8, 16], "INT32")]
    ins[0].set_data_from_numpy(x)
    ins[1].set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="exceeds the maximum allowed input size of 1024") as e:
        c.infer("simple", ins)
    assert e.value.status() == "400"
    # a compressed body that inflates past the limit is refused too
    bomb = gzip.compress(b"{" + b" " * 100000 + b"}")
    status, _, out = raw(s, "POST", "/v2/models/simple/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 400 and "exceeds the maximum allowed input size" in json.loads(out)["error"]
    assert c.is_server_live()


def test_curl_style_json_request(server):
    """A plain KServe v2 REST call, as curl sends it."""
    status, headers, out = raw(server, "POST", "/v2/models/simple/infer", _infer_body(GOOD_INPUTS),
                               {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(out)
    assert doc["outputs"][0]["name"] == "OUTPUT0"
    assert doc["outputs"][0]["data"] == [i + 1 for i in range(16)]
    assert doc["outputs"][0]["shape"] == [1, 16]
    # response compression follows Accept-Encoding, for responses of 500 bytes or more
    status, headers, out = raw(server, "POST", "/v2/models/simple/infer", _infer_body(GOOD_INPUTS),
                               {"Accept-Encoding": "deflate"})
    assert "content-encoding" not in headers and len(out) < 500
    assert json.loads(out)["outputs"][1]["data"] == [i - 1 for i in range(16)]
    batch = [dict(t, shape=[8, 16], data=t["data"] * 8) for t in GOOD_INPUTS]
    status, headers, out = raw(server, "POST", "/v2/models/simple/infer", _infer_body(batch),
                               {"Accept-Encoding": "deflate"})
    assert headers.get("content-encoding") == "deflate"
    assert json.loads(zlib.decompress(out))["outputs"][1]["data"] == [i - 1 for i in range(16)] * 8
    # nested data is accepted as well as flat
    nested = [dict(GOOD_INPUTS[0], data=[list(range(16))]), dict(GOOD_INPUTS[1], data=[[1] * 16])]
    status, _, out = raw(server, "POST", "/v2/models/simple/infer", _infer_body(nested))
    assert status == 200


def test_binary_output_of_bytes(server):
    c = httpclient.InferenceServerClient(server.http_url)
    x = np.array([str(i).encode() for i in range(16)], dtype=np.object_).reshape(1, 16)
    ins = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    ins[0].set_data_from_numpy(x)
    ins[1].set_data_from_numpy(x)
    r = c.infer("simple_string", ins)
    assert [int(v) for v in r.as_numpy("OUTPUT0").reshape(-1)] == [2 * i for i in range(16)]
