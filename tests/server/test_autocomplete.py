"""Model configs as Triton shows them: the defaults it fills in at load (instance groups, version
policy, optimization, backend fields, preferred batch sizes) and a python model's
`auto_complete_config`, over HTTP and gRPC, with and without `--strict-model-config`.

What Triton shows was recorded from tritonserver 2.51 (the nvidia-pytriton 0.7.0 wheel, CPU
host) serving the repository `write_repo` builds, into `triton_2_51_configs.json`; Torpor's
answers must equal it field by field. Where that binary is present (TORPOR_TRITONSERVER_DIR,
by default the one on these machines) `test_recording_is_what_triton_says` serves the same
repository with it and checks the recording; `TORPOR_RECORD_TRITON=1` rewrites the file from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from torpor.config import ModelConfig

from ..conftest import EXAMPLES, free_port

RECORDING = Path(__file__).with_name("triton_2_51_configs.json")
TRITON_DIR = Path(os.environ.get(
    "TORPOR_TRITONSERVER_DIR", "/work/tritonvenv/lib/python3.11/site-packages/pytriton/tritonserver"))

BUNDLED = ["simple", "simple_sequence", "simple_dyna_sequence"]

# Identity on one FP32 vector. The completing variant declares its tensors, a max batch size of
# 4 and dynamic batching from the model file, as a python model without a config.pbtxt must.
PLAIN_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())]) for r in requests]
'''
COMPLETING_MODEL = PLAIN_MODEL + '''
    @staticmethod
    def auto_complete_config(config):
        declared = config.as_dict()
        if not any(i["name"] == "IN" for i in declared["input"]):
            config.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [4]})
        if not any(o["name"] == "OUT" for o in declared["output"]):
            config.add_output({"name": "OUT", "data_type": "TYPE_FP32", "dims": [4]})
        config.set_max_batch_size(4)
        config.set_dynamic_batching()
        return config
'''
TENSORS = '''
input [{ name: "IN" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "OUT" data_type: TYPE_FP32 dims: [4] }]
'''
# name -> (model file, config.pbtxt body after name and backend, or None for no config.pbtxt)
OWN_MODELS = {
    # no config.pbtxt at all: everything comes from the model file and Triton's defaults
    "completed": (COMPLETING_MODEL, None),
    # a config without batching or instance groups: the model adds the batching
    "completed_cfg": (COMPLETING_MODEL, TENSORS),
    # unnamed groups are numbered, count 0 becomes 1, a named group keeps its name; the
    # sequence batcher's idle timeout defaults to 1 s
    "groups": (PLAIN_MODEL, TENSORS + '''
max_batch_size: 2
sequence_batching { }
instance_group [{ count: 3 }, { kind: KIND_CPU name: "mine" }]
'''),
    # what a config sets stays: preferred sizes, a specific version policy, pinned memory off
    "tuned": (PLAIN_MODEL, TENSORS + '''
max_batch_size: 8
dynamic_batching { preferred_batch_size: [2] }
version_policy { specific { versions: [1] } }
optimization { input_pinned_memory { enable: false } priority: PRIORITY_MAX }
'''),
}
MODELS = BUNDLED + list(OWN_MODELS)


def write_repo(root: Path) -> Path:
    """The repository both servers are compared on: three bundled examples and OWN_MODELS."""
    root.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED:
        shutil.copytree(EXAMPLES / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name, (code, body) in OWN_MODELS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(textwrap.dedent(code))
        if body is not None:
            (root / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n{body}')
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return write_repo(tmp_path_factory.mktemp("autocomplete") / "models")


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(RECORDING.read_text())


@pytest.fixture(scope="module")
def servers(repo, tmp_path_factory):
    from ..conftest import Server

    logs = tmp_path_factory.mktemp("logs")
    started = {"default": Server(repo).start(logs), "strict": Server(repo, "--strict-model-config", "true", "--exit-on-error", "false").start(logs)}
    for s in started.values():
        wait_loaded(f"http://{s.http_url}", len(MODELS))
    yield started
    for s in started.values():
        s.stop()


def wait_loaded(url: str, count: int, timeout: float = 90.0) -> list[dict]:
    """The repository index once no model in it is still loading (Triton lists a folder it
    could not read without a state)."""
    deadline = time.monotonic() + timeout
    index: list[dict] = []
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"{url}/v2/repository/index", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                index = json.loads(r.read())
            if len(index) == count and all(m.get("state") not in ("LOADING", "UNLOADING") for m in index):
                return index
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}: models not loaded in {timeout} s: {index}")


def http_configs(url: str, names: list[str]) -> dict:
    """model -> its config JSON, or None where the server has no such model loaded."""
    out = {}
    for name in names:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/config", timeout=10) as r:
                out[name] = json.loads(r.read())
        except urllib.error.HTTPError:
            out[name] = None
    return out


def expected(recorded: dict, mode: str, name: str) -> dict | None:
    return recorded[mode][name]


@pytest.mark.parametrize("name", MODELS)
def test_http_config_is_tritons(servers, recorded, name):
    got = http_configs(f"http://{servers['default'].http_url}", [name])[name]
    assert got == expected(recorded, "default", name)


@pytest.mark.parametrize("name", MODELS)
def test_grpc_config_is_tritons(servers, recorded, name):
    client = grpcclient.InferenceServerClient(servers["default"].grpc_url)
    got = client.get_model_config(name).config
    assert got == json_format.ParseDict(expected(recorded, "default", name), ModelConfig())


def test_auto_complete_fills_what_triton_fills(servers):
    """The row of issue 20 on its own: a python model shows one CPU instance, and the batching
    its auto_complete_config declares."""
    config = httpclient.InferenceServerClient(servers["default"].http_url).get_model_config("completed")
    assert config["instance_group"] == [{"name": "completed", "kind": "KIND_CPU", "count": 1, "gpus": [],
                                         "secondary_devices": [], "profile": [], "passive": False,
                                         "host_policy": ""}]
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]
    assert [i["name"] for i in config["input"]] == ["IN"]


def test_strict_model_config_turns_auto_complete_off(servers, recorded):
    """As Triton: the model's auto_complete_config is not run (the config's max_batch_size 0
    stays, no dynamic batching) and a folder without config.pbtxt does not load, but the load
    time defaults (instance groups, ...) are still filled in."""
    url = servers["strict"].http_url
    got = http_configs(f"http://{url}", MODELS)
    for name in MODELS:
        assert got[name] == expected(recorded, "strict", name), name
    assert got["completed_cfg"]["max_batch_size"] == 0 and "dynamic_batching" not in got["completed_cfg"]
    assert got["completed"] is None
    with pytest.raises(InferenceServerException, match="completed"):
        httpclient.InferenceServerClient(url).get_model_config("completed")
    grpc_client = grpcclient.InferenceServerClient(servers["strict"].grpc_url)
    assert grpc_client.get_model_config("completed_cfg").config.instance_group[0].count == 1


def test_initialize_gets_the_completed_config(tmp_path, start_server):
    """`initialize(args)["model_config"]` is the config the front ends show, as in Triton."""
    model = tmp_path / "models" / "shows"
    (model / "1").mkdir(parents=True)
    # the completing model, answering with the model_config its initialize was given
    (model / "1" / "model.py").write_text(textwrap.dedent(COMPLETING_MODEL) + textwrap.dedent('''
        class TritonPythonModel(TritonPythonModel):
            def initialize(self, args):
                self.seen = args["model_config"]

            def execute(self, requests):
                import numpy as np
                seen = np.array([[self.seen.encode()]], dtype=object)
                return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUT", seen)]) for r in requests]
    '''))
    (model / "config.pbtxt").write_text('name: "shows"\nbackend: "python"\ninput [{ name: "IN" data_type: '
                                        'TYPE_FP32 dims: [4] }]\noutput [{ name: "OUT" data_type: TYPE_STRING '
                                        'dims: [1] }]\n')
    server = start_server(tmp_path / "models")
    wait_loaded(f"http://{server.http_url}", 1)
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("IN", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    seen = json.loads(client.infer("shows", [inp]).as_numpy("OUT").ravel()[0])
    assert seen == client.get_model_config("shows")
    assert seen["instance_group"][0]["name"] == "shows" and seen["max_batch_size"] == 4


def test_torchscript_model_gets_tritons_backend_fields(tmp_path, start_server):
    """Triton's rules for a PyTorch model, which the recording cannot show (its tritonserver has
    only the python backend): backend `pytorch` means platform `pytorch_libtorch` and file
    `model.pt`; one CPU instance."""
    torch = pytest.importorskip("torch")

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    model = tmp_path / "models" / "double"
    (model / "1").mkdir(parents=True)
    torch.jit.script(Double()).save(str(model / "1" / "model.pt"))
    (model / "config.pbtxt").write_text('name: "double"\nbackend: "pytorch"\nmax_batch_size: 4\n'
                                        'input [{ name: "x" data_type: TYPE_FP32 dims: [2] }]\n'
                                        'output [{ name: "y" data_type: TYPE_FP32 dims: [2] }]\n')
    server = start_server(tmp_path / "models")
    wait_loaded(f"http://{server.http_url}", 1)
    config = httpclient.InferenceServerClient(server.http_url).get_model_config("double")
    assert (config["backend"], config["platform"], config["default_model_filename"]) == (
        "pytorch", "pytorch_libtorch", "model.pt")
    assert [(g["name"], g["kind"], g["count"]) for g in config["instance_group"]] == [("double", "KIND_CPU", 1)]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}


# -- the recording, against the real tritonserver where it is installed --------------------------

def triton_configs(repo: Path, strict: bool, logs: Path) -> dict:
    """model -> config from tritonserver serving `repo` (None where it did not load)."""
    binary = TRITON_DIR / "bin" / "tritonserver"
    http, grpc, metrics = free_port(), free_port(), free_port()
    # the python backend finds its stub's Python packages through the venv of the tritonserver wheel
    env = dict(os.environ, PATH=f"{TRITON_DIR.parents[4] / 'bin'}:{os.environ.get('PATH', '')}")
    with open(logs / f"triton-{'strict' if strict else 'default'}.log", "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "--model-repository", str(repo), "--backend-directory", str(TRITON_DIR / "backends"),
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--exit-on-error", "false", "--strict-model-config", "true" if strict else "false"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_loaded(f"http://127.0.0.1:{http}", len(MODELS), timeout=120)
            return http_configs(f"http://127.0.0.1:{http}", MODELS)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_recording_is_what_triton_says(repo, recorded, tmp_path):
    if not (TRITON_DIR / "bin" / "tritonserver").exists():
        pytest.skip(f"no tritonserver at {TRITON_DIR} (set TORPOR_TRITONSERVER_DIR)")
    live = {mode: triton_configs(repo, mode == "strict", tmp_path) for mode in ("default", "strict")}
    if os.environ.get("TORPOR_RECORD_TRITON") == "1":
        RECORDING.write_text(json.dumps(live, indent=1) + "\n")
    assert live == recorded
