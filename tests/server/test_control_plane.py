"""Control-plane hardening: Triton's restricted APIs over HTTP and gRPC, `file:` overrides confined
to the model's folder, and code in load requests refused unless the server allows it. (The
restriction parser and the route/method groups on their own: tests/unit/test_access.py.)"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg
from tritonclient.utils import InferenceServerException

from ..conftest import ROOT, Server, make_repo

ADMIN = {"admin-key": "s3cret"}
GRPC_ADMIN = {"triton-grpc-protocol-admin-key": "s3cret"}
INFER = {"infer-key": "i-v"}
GRPC_INFER = {"triton-grpc-protocol-infer-key": "i-v"}


def raw(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_bad_restriction_flags_exit_2(simple_repo):
    for flag, spec in [("--http-restricted-api", "bogus:k=v"), ("--grpc-restricted-protocol", "trace")]:
        r = subprocess.run([sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(simple_repo),
                            flag, spec], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr


# -- a server with every group but health restricted ------------------------------------------

RESTRICTED = ["model-repository", "shared-memory", "model-config", "statistics", "trace", "logging", "metadata"]


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("locked_repo"), ["simple", "simple_string"])
    admin = ",".join(RESTRICTED)
    s = Server(repo, "--model-control-mode", "explicit", "--load-model", "simple", "--allow-client-shm", "true",
               "--http-restricted-api", f"{admin}:admin-key=s3cret", "--http-restricted-api", "inference:infer-key=i-v",
               "--grpc-restricted-protocol", f"{admin}:admin-key=s3cret",
               "--grpc-restricted-protocol", "inference:infer-key=i-v").start(tmp_path_factory.mktemp("locked_logs"))
    yield s
    s.stop()


HTTP_CALLS = {
    "model-repository": [("POST", "/v2/repository/index", b""), ("POST", "/v2/repository/models/simple_string/load", b""),
                         ("POST", "/v2/repository/models/simple_string/unload", b"")],
    "shared-memory": [("GET", "/v2/systemsharedmemory/status", None),
                      ("POST", "/v2/systemsharedmemory/region/r/register", b'{"key":"/x","offset":0,"byte_size":8}'),
                      ("POST", "/v2/systemsharedmemory/unregister", b""), ("GET", "/v2/cudasharedmemory/status", None)],
    "model-config": [("GET", "/v2/models/simple/config", None)],
    "statistics": [("GET", "/v2/models/stats", None), ("GET", "/v2/models/simple/stats", None)],
    "trace": [("GET", "/v2/trace/setting", None), ("POST", "/v2/trace/setting", b"{}"),
              ("GET", "/v2/models/simple/trace/setting", None)],
    "logging": [("GET", "/v2/logging", None), ("POST", "/v2/logging", b"{}")],
    "metadata": [("GET", "/v2", None), ("GET", "/v2/models/simple", None)],
}


@pytest.mark.parametrize("group", list(HTTP_CALLS))
def test_http_restricted_without_key_is_403(locked, group):
    for method, path, body in HTTP_CALLS[group]:
        status, out = raw(locked, method, path, body)
        assert status == 403, (path, out)
        assert json.loads(out) == {"error": "This API is restricted, expecting header 'admin-key'"}
        status, _ = raw(locked, method, path, body, {"admin-key": "wrong"})
        assert status == 403
    # with the key each one is served (GETs here, which change nothing)
    for method, path, body in HTTP_CALLS[group]:
        if method == "GET":
            status, out = raw(locked, method, path, body, ADMIN)
            assert status == 200, (path, out)


def test_http_restricted_infer_and_open_health(locked):
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}]}).encode()
    status, out = raw(locked, "POST", "/v2/models/simple/infer", body)
    assert status == 403 and "infer-key" in json.loads(out)["error"]
    # the admin key does not open another group
    assert raw(locked, "POST", "/v2/models/simple/infer", body, ADMIN)[0] == 403
    status, out = raw(locked, "POST", "/v2/models/simple/infer", body, {"Infer-Key": "i-v"})
    assert status == 200 and json.loads(out)["outputs"][0]["data"][:3] == [1, 2, 3]
    # health is not restricted
    c = httpclient.InferenceServerClient(locked.http_url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("simple")
    # tritonclient passes the header through
    with pytest.raises(InferenceServerException, match="This API is restricted") as e:
        c.unload_model("simple_string")
    assert e.value.status() == "403"
    c.load_model("simple_string", headers=ADMIN)
    assert c.is_model_ready("simple_string")
    c.unload_model("simple_string", headers=ADMIN)
    assert c.get_model_config("simple", headers=ADMIN)["name"] == "simple"


def _grpc_calls(stub):
    r = pb
    return {
        "model-repository": [(stub.RepositoryIndex, r.RepositoryIndexRequest()),
                             (stub.RepositoryModelLoad, r.RepositoryModelLoadRequest(model_name="simple_string")),
                             (stub.RepositoryModelUnload, r.RepositoryModelUnloadRequest(model_name="simple_string"))],
        "shared-memory": [(stub.SystemSharedMemoryStatus, r.SystemSharedMemoryStatusRequest()),
                          (stub.SystemSharedMemoryRegister, r.SystemSharedMemoryRegisterRequest(name="r", key="/x", byte_size=8)),
                          (stub.SystemSharedMemoryUnregister, r.SystemSharedMemoryUnregisterRequest()),
                          (stub.CudaSharedMemoryStatus, r.CudaSharedMemoryStatusRequest()),
                          (stub.CudaSharedMemoryRegister, r.CudaSharedMemoryRegisterRequest(name="c")),
                          (stub.CudaSharedMemoryUnregister, r.CudaSharedMemoryUnregisterRequest())],
        "model-config": [(stub.ModelConfig, r.ModelConfigRequest(name="simple"))],
        "statistics": [(stub.ModelStatistics, r.ModelStatisticsRequest(name="simple"))],
        "trace": [(stub.TraceSetting, r.TraceSettingRequest())],
        "logging": [(stub.LogSettings, r.LogSettingsRequest())],
        "metadata": [(stub.ServerMetadata, r.ServerMetadataRequest()),
                     (stub.ModelMetadata, r.ModelMetadataRequest(name="simple"))],
    }


def test_grpc_restricted_without_key(locked):
    with grpc.insecure_channel(locked.grpc_url) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        for group, calls in _grpc_calls(stub).items():
            for rpc, req in calls:
                with pytest.raises(grpc.RpcError) as e:
                    rpc(req, timeout=10)
                # Triton's own answer: UNAVAILABLE with this text (not PERMISSION_DENIED)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (group, rpc)
                assert e.value.details() == "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
        stub.ModelConfig(pb.ModelConfigRequest(name="simple"), metadata=tuple(GRPC_ADMIN.items()), timeout=10)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # health stays open
    c = grpcclient.InferenceServerClient(locked.grpc_url)
    with pytest.raises(InferenceServerException, match="This protocol is restricted") as e:
        c.get_inference_statistics("simple")
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert c.get_inference_statistics("simple", headers=GRPC_ADMIN).model_stats[0].name == "simple"
    # inference, unary and streaming
    ins = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    for i in ins:
        i.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    with pytest.raises(InferenceServerException, match="triton-grpc-protocol-infer-key"):
        c.infer("simple", ins)
    assert (c.infer("simple", ins, headers=GRPC_INFER).as_numpy("OUTPUT0") == 2).all()
    errors = []
    c.start_stream(callback=lambda result, error: errors.append(error))
    try:
        c.async_stream_infer("simple", ins)
    except InferenceServerException:
        pass  # the server may already have ended the stream: the reason comes through the callback
    c.stop_stream()
    assert errors and "This protocol is restricted" in str(errors[0])
    c.close()


# -- file: overrides --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("ctl_repo"), ["simple"])
    s = Server(repo, "--model-control-mode", "explicit", "--load-model", "simple").start(tmp_path_factory.mktemp("ctl_logs"))
    yield s
    s.stop()


def _simple_config(name: str) -> str:
    from torpor.config import config_to_dict, parse_config_text

    text = (ROOT / "examples" / "models" / "simple" / "config.pbtxt").read_text()
    cfg = config_to_dict(parse_config_text(text))
    cfg["name"] = name
    return json.dumps(cfg)


def _load(server, model, params):
    body = json.dumps({"parameters": params}).encode()
    status, out = raw(server, "POST", f"/v2/repository/models/{model}/load", body)
    return status, (json.loads(out) if out else {})


@pytest.mark.parametrize("key", ["file:../escape.txt", "file:1/../../escape.txt", "file:/tmp/torpor-abs-escape.txt",
                                 "file:", "file:1/\0x"])
def test_file_override_path_traversal_refused(explicit, tmp_path, key):
    status, out = _load(explicit, "uploaded", {"config": _simple_config("uploaded"),
                                               key: base64.b64encode(b"data").decode()})
    assert status == 400, out
    assert "failed to load 'uploaded'" in out["error"] and "invalid file path" in out["error"]
    assert not (Path(tempfile.gettempdir()) / "escape.txt").exists()
    assert not Path("/tmp/torpor-abs-escape.txt").exists()
    # gRPC: the same refusal as INVALID_ARGUMENT
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    with pytest.raises(InferenceServerException, match="invalid file path") as e:
        c.load_model("uploaded", config=_simple_config("uploaded"), files={key: b"data"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert c.is_model_ready("simple")


def test_code_in_file_override_refused_by_default(explicit):
    code = (ROOT / "examples" / "models" / "simple" / "1" / "model.py").read_bytes()
    status, out = _load(explicit, "uploaded", {"config": _simple_config("uploaded"),
                                               "file:1/model.py": base64.b64encode(code).decode()})
    assert status == 400 and "--allow-override-code" in out["error"], out
    # a python-backend model whose code hides behind another name is refused all the same
    cfg = json.loads(_simple_config("uploaded"))
    cfg["default_model_filename"] = "model.txt"
    status, out = _load(explicit, "uploaded", {"config": json.dumps(cfg),
                                               "file:1/model.txt": base64.b64encode(code).decode()})
    assert status == 400 and "--allow-override-code" in out["error"], out
    c = httpclient.InferenceServerClient(explicit.http_url)
    assert not c.is_model_ready("uploaded") and c.is_model_ready("simple")


def test_config_override_may_not_name_files_outside_or_pick_code(explicit):
    for cfg in ({"default_model_filename": "../../../../etc/hostname"},
                {"default_model_filename": "/etc/hostname"},
                {"parameters": {"torpor.module_class": {"string_value": "os:system"}}}):
        status, out = _load(explicit, "simple", {"config": json.dumps(cfg)})
        assert status == 400, (cfg, out)
        assert "failed to load 'simple'" in out["error"]
    # the refused reload left the serving version alone
    c = httpclient.InferenceServerClient(explicit.http_url)
    assert c.is_model_ready("simple")
    assert c.get_model_config("simple")["default_model_filename"] == "model.py"  # Triton's default, not the refused one
