"""Compatibility with KServe's own Python clients (kserve 0.21: InferenceRESTClient v2, InferenceGRPCClient).

kserve pins and downgrades packages, so it never goes into the project venv: the session fixture
`kserve_python` (tests/compat/conftest.py) builds it once in a venv of its own, and each
protocol's checks run there as one small client script, written here into a temporary folder,
that prints one JSON document of results. The tests assert on that document.

Things KServe's clients rely on that tritonclient does not (protocol notes §7, drop-in gotchas):
- REST health: `response.json()["live"]` / `["ready"]`, so health bodies must be JSON, not empty;
- REST model ready: only the status code (2xx = ready);
- REST errors: the message is read from `{"error": ...}` only when Content-Type is exactly `application/json`;
- REST infer: always sends an `id` (a uuid when the user gives none) and `model_name` in the body;
  binary inputs go with `content-type: application/octet-stream`, JSON ones with `application/json`;
  httpx asks for gzip, so infer responses of 500 bytes or more come back compressed;
- gRPC: kserve's own `inference` protos (a subset of Triton's); it reads typed `contents` as well
  as `raw_output_contents` and may send either.

Metadata has no client method in kserve 0.21, so the REST script validates Torpor's answers
against kserve's own pydantic data models, and the gRPC script calls kserve's generated stub.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ..conftest import Server, make_repo

MODELS = ["simple", "simple_string"]


def run_client(python: Path, script_dir: Path, name: str, source: str, config: dict) -> dict:
    script = script_dir / f"{name}.py"
    script.write_text(source)
    p = subprocess.run(
        [str(python), str(script), json.dumps(config)],
        check=False, capture_output=True, text=True, timeout=180, cwd=script_dir,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    (script_dir / f"{name}.out").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)  # kept for debugging
    assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def ok(results: dict, check: str):
    """The value a check returned; fails with the client's own exception otherwise."""
    r = results[check]
    assert r["ok"], (
        f"kserve client check '{check}' raised {r['error']}\n{r.get('traceback', '')}\n"
        f"server after the client ran: {results.get('_server', '?')}"
    )
    return r["value"]


def server_state(server: Server) -> str:
    code = server.proc.poll() if server.proc else None
    state = "running" if code is None else f"exited with {code}"
    return f"{state} (http {server.http_url}); log tail:\n{server.log()[-2000:]}"


def expected_simple():
    a, b = list(range(16)), [1] * 16
    return [x + y for x, y in zip(a, b)], [x - y for x, y in zip(a, b)]


def tensor(datatype: str, data: list) -> dict:
    """An output as the client scripts describe it: [1, 16], as the response and as the numpy array."""
    return {"datatype": datatype, "shape": [1, 16], "data": data, "array_shape": [1, 16]}


def expected_string():
    a, b = list(range(16)), [1] * 16
    return [str(x + y) for x, y in zip(a, b)], [str(x - y) for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("kserve-repo"), MODELS)
    s = Server(repo).start(tmp_path_factory.mktemp("kserve-logs"))
    yield s
    s.stop()


# -- REST ---------------------------------------------------------------------------------------

COMMON = r'''
import asyncio, json, sys, traceback
import numpy as np

CFG = json.loads(sys.argv[1])
RESULTS = {}

async def check(name, coro):
    try:
        RESULTS[name] = {"ok": True, "value": await coro}
    except BaseException as e:  # noqa: BLE001 - report everything to the test
        resp = getattr(e, "response", None)
        code = getattr(e, "code", None)
        RESULTS[name] = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "status": getattr(resp, "status_code", None),
            "grpc_code": code().name if callable(code) else None,
            "grpc_details": e.details() if callable(getattr(e, "details", None)) else None,
            "traceback": traceback.format_exc()[-3000:],
        }

def strings(arr):
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(arr).reshape(-1).tolist()]

def simple_inputs(InferInput, binary):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    ins = [InferInput("INPUT0", [1, 16], "INT32"), InferInput("INPUT1", [1, 16], "INT32")]
    ins[0].set_data_from_numpy(a, binary_data=binary)
    ins[1].set_data_from_numpy(b, binary_data=binary)
    return ins

def string_inputs(InferInput, binary):
    a = np.array([str(i).encode() for i in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array([b"1"] * 16, dtype=np.object_).reshape(1, 16)
    ins = [InferInput("INPUT0", [1, 16], "BYTES"), InferInput("INPUT1", [1, 16], "BYTES")]
    ins[0].set_data_from_numpy(a, binary_data=binary)
    ins[1].set_data_from_numpy(b, binary_data=binary)
    return ins

def describe(res):
    outs = {}
    for o in res.outputs:
        arr = o.as_numpy()
        outs[o.name] = {
            "datatype": o.datatype,
            "shape": list(o.shape),
            "data": strings(arr) if o.datatype == "BYTES" else arr.reshape(-1).tolist(),
            "array_shape": list(arr.shape),
        }
    return {"id": res.id, "model_name": res.model_name, "outputs": outs}
'''

REST_CLIENT = COMMON + r'''
import httpx
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest import v2_datamodels as dm

BASE = CFG["base_url"]

async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))

    await check("server_live", client.is_server_live(BASE))
    await check("server_ready", client.is_server_ready(BASE))
    await check("model_ready", client.is_model_ready(BASE, "simple"))
    await check("model_ready_string", client.is_model_ready(BASE, "simple_string"))
    await check("model_ready_unknown", client.is_model_ready(BASE, "no_such_model"))

    # No metadata call in the client: fetch with httpx (kserve's HTTP library) and validate
    # against kserve's own REST data models.
    async with httpx.AsyncClient(base_url=BASE) as h:
        async def validated(path, model):
            r = await h.get(path)
            r.raise_for_status()
            return model.model_validate_json(r.content).model_dump()
        await check("meta_live", validated("/v2/health/live", dm.ServerLiveResponse))
        await check("meta_ready", validated("/v2/health/ready", dm.ServerReadyResponse))
        await check("meta_server", validated("/v2", dm.ServerMetadataResponse))
        await check("meta_simple", validated("/v2/models/simple", dm.ModelMetadataResponse))
        await check("meta_string", validated("/v2/models/simple_string", dm.ModelMetadataResponse))
        await check("meta_simple_ready", validated("/v2/models/simple/ready", dm.ModelReadyResponse))

    async def infer(model, inputs, request_id=None, parameters=None, outputs=None, request_headers=None):
        headers = {}
        req = InferRequest(model_name=model, infer_inputs=inputs, request_id=request_id,
                           parameters=parameters, request_outputs=outputs)
        res = await client.infer(BASE, req, model_name=model, headers=request_headers,
                                 response_headers=headers)
        d = describe(res)
        d["content_type"] = headers.get("content-type")
        d["content_encoding"] = headers.get("content-encoding")
        d["binary_header"] = headers.get("inference-header-content-length")
        return d

    # simple (INT32)
    await check("simple_json", infer("simple", simple_inputs(InferInput, False), "kserve-json"))
    await check("simple_binary_in", infer("simple", simple_inputs(InferInput, True), "kserve-bin-in"))
    await check("simple_binary_out", infer("simple", simple_inputs(InferInput, False), "kserve-bin-out",
                                           parameters={"binary_data_output": True}))
    await check("simple_binary_both", infer("simple", simple_inputs(InferInput, True), "kserve-bin-both",
                                            parameters={"binary_data_output": True}))
    # httpx asks for gzip by default; the same binary reply uncompressed
    await check("simple_binary_identity", infer("simple", simple_inputs(InferInput, True), "kserve-identity",
                                                parameters={"binary_data_output": True},
                                                request_headers={"Accept-Encoding": "identity"}))
    await check("simple_mixed_outputs", infer(
        "simple", simple_inputs(InferInput, True), "kserve-mixed",
        outputs=[RequestedOutput("OUTPUT0", {"binary_data": True}),
                 RequestedOutput("OUTPUT1", {"binary_data": False})]))
    await check("simple_one_output", infer("simple", simple_inputs(InferInput, False), "kserve-one",
                                           outputs=[RequestedOutput("OUTPUT1")]))
    await check("simple_no_id", infer("simple", simple_inputs(InferInput, False)))
    # simple_string (BYTES)
    await check("string_json", infer("simple_string", string_inputs(InferInput, False), "kserve-str-json"))
    await check("string_binary_in", infer("simple_string", string_inputs(InferInput, True),
                                          "kserve-str-bin-in"))
    await check("string_binary_both", infer("simple_string", string_inputs(InferInput, True),
                                            "kserve-str-bin", parameters={"binary_data_output": True}))
    # errors
    await check("unknown_model", infer("no_such_model", simple_inputs(InferInput, False), "kserve-unknown"))
    await check("bad_shape", infer("simple", [
        InferInput("INPUT0", [1, 3], "INT32", data=[1, 2, 3]),
        InferInput("INPUT1", [1, 3], "INT32", data=[1, 2, 3]),
    ], "kserve-bad"))

    await client.close()

asyncio.run(main())
print(json.dumps(RESULTS))
'''


@pytest.fixture(scope="module")
def rest(kserve_python, kserve_server, tmp_path_factory) -> dict:
    results = run_client(
        kserve_python, tmp_path_factory.mktemp("kserve-rest"), "kserve_rest_client", REST_CLIENT,
        {"base_url": f"http://{kserve_server.http_url}"},
    )
    results["_server"] = server_state(kserve_server)
    return results


def test_rest_health(rest):
    assert ok(rest, "server_live") is True
    assert ok(rest, "server_ready") is True


def test_rest_model_ready(rest):
    assert ok(rest, "model_ready") is True
    assert ok(rest, "model_ready_string") is True
    # v2: readiness is the status code; an unknown model is "not ready", not an exception
    assert ok(rest, "model_ready_unknown") is False


def test_rest_metadata_matches_kserve_models(rest):
    assert ok(rest, "meta_live") == {"live": True}
    assert ok(rest, "meta_ready") == {"ready": True}
    server = ok(rest, "meta_server")
    assert server["name"] == "triton" and "binary_tensor_data" in server["extensions"]
    simple = ok(rest, "meta_simple")
    assert simple["name"] == "simple" and simple["versions"] == ["1"]
    assert simple["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    assert [o["name"] for o in simple["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    string = ok(rest, "meta_string")
    assert {t["datatype"] for t in string["inputs"] + string["outputs"]} == {"BYTES"}
    assert ok(rest, "meta_simple_ready") == {"name": "simple", "ready": True}


@pytest.mark.parametrize(
    "check, request_id, binary_out",
    [
        ("simple_json", "kserve-json", False),
        ("simple_binary_in", "kserve-bin-in", False),
        ("simple_binary_out", "kserve-bin-out", True),
        ("simple_binary_both", "kserve-bin-both", True),
        ("simple_binary_identity", "kserve-identity", True),
    ],
)
def test_rest_infer_simple(rest, check, request_id, binary_out):
    r = ok(rest, check)
    assert r["id"] == request_id and r["model_name"] == "simple"
    s, d = expected_simple()
    assert r["outputs"] == {"OUTPUT0": tensor("INT32", s), "OUTPUT1": tensor("INT32", d)}
    # binary replies carry the JSON length; JSON replies are exactly application/json
    if binary_out:
        assert r["binary_header"] is not None and r["content_type"] == "application/octet-stream"
    else:
        assert r["binary_header"] is None and r["content_type"] == "application/json"
    # httpx sends Accept-Encoding: gzip, deflate; replies under 500 bytes go uncompressed anyway
    assert r["content_encoding"] is None


def test_rest_infer_requested_outputs(rest):
    s, d = expected_simple()
    mixed = ok(rest, "simple_mixed_outputs")
    assert mixed["outputs"]["OUTPUT0"]["data"] == s and mixed["outputs"]["OUTPUT1"]["data"] == d
    assert mixed["binary_header"] is not None
    one = ok(rest, "simple_one_output")
    assert list(one["outputs"]) == ["OUTPUT1"] and one["outputs"]["OUTPUT1"]["data"] == d
    # the client makes up a uuid when the user gives no id; Torpor echoes it
    no_id = ok(rest, "simple_no_id")
    assert isinstance(no_id["id"], str) and len(no_id["id"]) == 36


@pytest.mark.parametrize(
    "check, request_id",
    [
        ("string_json", "kserve-str-json"),
        ("string_binary_in", "kserve-str-bin-in"),
        ("string_binary_both", "kserve-str-bin"),
    ],
)
def test_rest_infer_simple_string(rest, check, request_id):
    r = ok(rest, check)
    assert r["id"] == request_id and r["model_name"] == "simple_string"
    s, d = expected_string()
    assert r["outputs"] == {"OUTPUT0": tensor("BYTES", s), "OUTPUT1": tensor("BYTES", d)}


def test_rest_errors(rest):
    r = rest["unknown_model"]
    assert not r["ok"] and r["error"].startswith("HTTPStatusError")
    assert r["status"] in (400, 404)
    # the client puts the server's {"error": ...} message into its exception
    assert "Request for unknown model" in r["error"] and "no_such_model" in r["error"]
    bad = rest["bad_shape"]
    assert not bad["ok"] and bad["status"] == 400 and "INPUT0" in bad["error"]


# -- gRPC ---------------------------------------------------------------------------------------

GRPC_CLIENT = COMMON + r'''
import grpc
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from google.protobuf import json_format

URL = CFG["url"]

async def main():
    client = InferenceGRPCClient(URL, timeout=60)  # default retry policy, as users get it

    await check("server_live", client.is_server_live())
    await check("server_ready", client.is_server_ready())
    await check("model_ready", client.is_model_ready("simple"))
    await check("model_ready_string", client.is_model_ready("simple_string"))
    await check("model_ready_unknown", client.is_model_ready("no_such_model"))

    # No metadata methods in the client: call kserve's own generated stub.
    async def meta(req, rpc):
        r = await rpc(req, timeout=60)
        return json_format.MessageToDict(r, preserving_proto_field_name=True)
    stub = client._client_stub
    await check("meta_server", meta(pb.ServerMetadataRequest(), stub.ServerMetadata))
    await check("meta_simple", meta(pb.ModelMetadataRequest(name="simple"), stub.ModelMetadata))
    await check("meta_unknown", meta(pb.ModelMetadataRequest(name="no_such_model"), stub.ModelMetadata))

    async def infer(model, inputs, request_id=None, outputs=None, model_version=None):
        req = InferRequest(model_name=model, infer_inputs=inputs, request_id=request_id,
                           request_outputs=outputs, model_version=model_version)
        return describe(await client.infer(req))

    # binary_data=True -> raw_input_contents; False -> typed contents (int_contents / bytes_contents)
    await check("simple_raw", infer("simple", simple_inputs(InferInput, True), "kserve-grpc-raw"))
    await check("simple_contents", infer("simple", simple_inputs(InferInput, False), "kserve-grpc-contents"))
    await check("simple_version", infer("simple", simple_inputs(InferInput, True), "kserve-grpc-v1",
                                        model_version="1"))
    await check("simple_one_output", infer("simple", simple_inputs(InferInput, True), "kserve-grpc-one",
                                           outputs=[RequestedOutput("OUTPUT1")]))
    await check("simple_no_id", infer("simple", simple_inputs(InferInput, True)))
    await check("string_raw", infer("simple_string", string_inputs(InferInput, True), "kserve-grpc-str-raw"))
    await check("string_contents", infer("simple_string", string_inputs(InferInput, False),
                                         "kserve-grpc-str-contents"))
    await check("unknown_model", infer("no_such_model", simple_inputs(InferInput, True),
                                       "kserve-grpc-unknown"))

    await client.close()

asyncio.run(main())
print(json.dumps(RESULTS))
'''


@pytest.fixture(scope="module")
def grpc_results(kserve_python, kserve_server, tmp_path_factory) -> dict:
    results = run_client(
        kserve_python, tmp_path_factory.mktemp("kserve-grpc"), "kserve_grpc_client", GRPC_CLIENT,
        {"url": kserve_server.grpc_url},
    )
    results["_server"] = server_state(kserve_server)
    return results


def test_grpc_health(grpc_results):
    assert ok(grpc_results, "server_live") is True
    assert ok(grpc_results, "server_ready") is True
    assert ok(grpc_results, "model_ready") is True
    assert ok(grpc_results, "model_ready_string") is True
    # Triton answers ModelReady of an unknown model with ready=false, not an error
    assert ok(grpc_results, "model_ready_unknown") is False


def test_grpc_metadata(grpc_results):
    server = ok(grpc_results, "meta_server")
    assert server["name"] == "triton" and "binary_tensor_data" in server["extensions"]
    simple = ok(grpc_results, "meta_simple")
    assert simple["name"] == "simple" and simple["versions"] == ["1"]
    # MessageToDict prints int64 dims as strings
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in simple["inputs"]] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16]),
    ]
    unknown = grpc_results["meta_unknown"]
    assert not unknown["ok"] and unknown["grpc_code"] in ("NOT_FOUND", "UNAVAILABLE", "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    "check, request_id",
    [
        ("simple_raw", "kserve-grpc-raw"),
        ("simple_contents", "kserve-grpc-contents"),
        ("simple_version", "kserve-grpc-v1"),
    ],
)
def test_grpc_infer_simple(grpc_results, check, request_id):
    r = ok(grpc_results, check)
    assert r["id"] == request_id and r["model_name"] == "simple"
    s, d = expected_simple()
    assert r["outputs"] == {"OUTPUT0": tensor("INT32", s), "OUTPUT1": tensor("INT32", d)}


def test_grpc_infer_requested_output_and_no_id(grpc_results):
    _, d = expected_simple()
    one = ok(grpc_results, "simple_one_output")
    assert list(one["outputs"]) == ["OUTPUT1"] and one["outputs"]["OUTPUT1"]["data"] == d
    assert ok(grpc_results, "simple_no_id")["id"] == ""


@pytest.mark.parametrize(
    "check, request_id",
    [("string_raw", "kserve-grpc-str-raw"), ("string_contents", "kserve-grpc-str-contents")],
)
def test_grpc_infer_simple_string(grpc_results, check, request_id):
    r = ok(grpc_results, check)
    assert r["id"] == request_id and r["model_name"] == "simple_string"
    s, d = expected_string()
    assert r["outputs"]["OUTPUT0"]["data"] == s and r["outputs"]["OUTPUT1"]["data"] == d


def test_grpc_unknown_model(grpc_results):
    r = grpc_results["unknown_model"]
    assert not r["ok"] and r["grpc_code"] is not None
    assert "Request for unknown model" in (r["grpc_details"] or "")
