"""Triton's python_backend examples, run unmodified against Torpor, and the python_backend
features they rely on, tested on their own.

The examples live in triton-inference-server/python_backend (`examples/`); point
TRITON_PYTHON_BACKEND_EXAMPLES at that folder. Each is laid out as its README says (model files
copied to `<model>/1/model.py`, configs to `<model>/config.pbtxt`; none for auto_complete), served
by Torpor, and its own client script run as it is. The clients talk to the fixed ports
localhost:8000/8001/8002, so server and client run in a private network namespace
(`unshare -rn`) of their own; without one the test runs on the machine's ports when they are
free and is skipped when not. Examples whose dependencies this machine lacks are skipped with the
reason. The example tests are skipped when the folder is absent (as in CI); the feature tests
below them always run.

This module is also the driver that runs inside the namespace:
`python -m tests.compat.test_python_backend_examples --drive REPO RESULT.json CLIENT...`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gc
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = Path(os.environ.get("TRITON_PYTHON_BACKEND_EXAMPLES", "/work/python_backend-src/examples"))
PORTS = (8000, 8001, 8002)  # where the example clients look for the server

# model name -> (model file, config file or None), relative to EXAMPLES, as the READMEs copy them
MODELS = {
    "add_sub": ("add_sub/model.py", "add_sub/config.pbtxt"),
    "pytorch": ("pytorch/model.py", "pytorch/config.pbtxt"),
    "nobatch_auto_complete": ("auto_complete/nobatch_model.py", None),
    "batch_auto_complete": ("auto_complete/batch_model.py", None),
    "bls_sync": ("bls/sync_model.py", "bls/sync_config.pbtxt"),
    "bls_async": ("bls/async_model.py", "bls/async_config.pbtxt"),
    "bls_decoupled_sync": ("bls_decoupled/sync_model.py", "bls_decoupled/sync_config.pbtxt"),
    "bls_decoupled_async": ("bls_decoupled/async_model.py", "bls_decoupled/async_config.pbtxt"),
    "square_int32": ("decoupled/square_model.py", "decoupled/square_config.pbtxt"),
    "repeat_int32": ("decoupled/repeat_model.py", "decoupled/repeat_config.pbtxt"),
    "custom_metrics": ("custom_metrics/model.py", "custom_metrics/config.pbtxt"),
    "jax": ("jax/model.py", "jax/config.pbtxt"),
}


@dataclasses.dataclass
class Example:
    name: str
    models: list[str]
    clients: list[str]
    expect: list[str]  # what Triton's run prints (checked in the clients' stdout)
    needs: list[str] = dataclasses.field(default_factory=list)  # modules the models import
    skip: str = ""


EXAMPLE_RUNS = [
    Example("add_sub", ["add_sub"], ["add_sub/client.py"], ["PASS: add_sub"]),
    Example("pytorch", ["pytorch"], ["pytorch/client.py"], ["PASS: pytorch"], needs=["torch"]),
    Example("auto_complete", ["nobatch_auto_complete", "batch_auto_complete"], ["auto_complete/client.py"],
            ["'nobatch_auto_complete' configuration matches the expected auto complete configuration",
             "'batch_auto_complete' configuration matches the expected auto complete configuration",
             "PASS: auto_complete"]),
    # The client's third request names a model that does not exist; it only prints the error.
    Example("bls_sync", ["add_sub", "bls_sync", "pytorch"], ["bls/sync_client.py"],
            ["=========='undefined' model result==========",
             "Failed to process the request(s) for model", "undefined_model", "PASS: BLS Sync"], needs=["torch"]),
    Example("bls_async", ["add_sub", "bls_async", "pytorch"], ["bls/async_client.py"], ["PASS: BLS Async"],
            needs=["torch"]),
    Example("bls_decoupled_sync", ["bls_decoupled_sync", "square_int32"], ["bls_decoupled/sync_client.py"],
            ["The square value of [4] is [16]", "PASS: BLS Decoupled Sync"]),
    Example("bls_decoupled_async", ["bls_decoupled_async", "square_int32"], ["bls_decoupled/async_client.py"],
            ["Two times the square value of [4] is [32]", "PASS: BLS Decoupled Async"]),
    Example("custom_metrics", ["custom_metrics"], ["custom_metrics/client.py"],
            ["found pattern 'requests_process_latency_ns{model=\"custom_metrics\",version=\"1\"}' in metrics",
             "PASS: custom_metrics"]),
    Example("decoupled", ["repeat_int32", "square_int32"], ["decoupled/repeat_client.py", "decoupled/square_client.py"],
            ["PASS: repeat_int32", "PASS: square_int32"]),
    Example("jax", ["jax"], ["jax/client.py"], ["PASS: jax"], needs=["jax"]),
    Example("instance_kind", [], [], [], skip="needs the network: its model downloads torchvision's ResNet-50 "
            "weights and its client fetches torch.hub utilities and a COCO image"),
    Example("preprocessing", [], [], [], skip="needs a TensorRT engine built with trtexec and an ensemble; "
            "Torpor serves neither TensorRT plans nor ensembles"),
]


def lay_out(example: Example, repo: Path) -> Path:
    for model in example.models:
        model_file, config = MODELS[model]
        (repo / model / "1").mkdir(parents=True)
        shutil.copy(EXAMPLES / model_file, repo / model / "1" / "model.py")
        if config is not None:
            shutil.copy(EXAMPLES / config, repo / model / "config.pbtxt")
    return repo


# --------------------------------------------------------------------------------------------
# the driver: one server on the fixed ports, the clients after it (inside the namespace)
# --------------------------------------------------------------------------------------------


def _loopback_up() -> None:
    """`ip link set lo up`, for a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, request)[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 0x1))


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def drive(repo: str, result_path: str, clients: list[str], netns: bool) -> int:
    if netns:
        _loopback_up()
    server_log = Path(result_path).with_suffix(".server.log")
    with open(server_log, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "torpor.cli", "serve", "--model-repository", repo, "--devices", "none"],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
        )
        ran = []
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and server.poll() is None:
                if _get(f"http://127.0.0.1:{PORTS[0]}/v2/health/ready") == 200:
                    break
                time.sleep(0.2)
            for client in clients:
                r = subprocess.run([sys.executable, str(EXAMPLES / client)], cwd=EXAMPLES.parent,
                                   capture_output=True, text=True, timeout=300, check=False)
                ran.append({"client": client, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr})
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    Path(result_path).write_text(json.dumps({"clients": ran, "server_log": server_log.read_text(errors="replace")}))
    return 0


def _can_unshare() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ports_free() -> bool:
    for port in PORTS:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def run_example(repo: Path, clients: list[str], work: Path) -> dict:
    result = work / "result.json"
    command = [sys.executable, "-m", "tests.compat.test_python_backend_examples", "--drive", str(repo), str(result)]
    if _can_unshare():
        command = ["unshare", "-rn", *command, "--netns"]
    elif not _ports_free():
        pytest.skip(f"no private network namespace (unshare -rn) and ports {PORTS} are taken")
    subprocess.run([*command, *clients], cwd=ROOT, timeout=1200, check=True)
    return json.loads(result.read_text())


# --------------------------------------------------------------------------------------------
# the examples
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="Triton python_backend examples not available")
@pytest.mark.parametrize("example", EXAMPLE_RUNS, ids=lambda e: e.name)
def test_python_backend_example(example: Example, tmp_path):
    if example.skip:
        pytest.skip(example.skip)
    missing = [m for m in example.needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the example's model imports {', '.join(missing)}, not installed here")
    repo = lay_out(example, tmp_path / "models")
    result = run_example(repo, example.clients, tmp_path)
    assert [c["client"] for c in result["clients"]] == example.clients, result["server_log"][-4000:]
    for c in result["clients"]:
        assert c["rc"] == 0, f"{c['client']}:\n{c['stdout'][-3000:]}\n{c['stderr'][-3000:]}\n{result['server_log'][-3000:]}"
    printed = "".join(c["stdout"] for c in result["clients"])
    for text in example.expect:
        assert text in printed


# --------------------------------------------------------------------------------------------
# the features, without the examples: auto-complete, bytes names, custom metrics, async decoupled
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pb():
    """triton_python_backend_utils, as models import it."""
    from torpor.adapters import python_backend

    return python_backend.pb_utils


def write_model(repo: Path, name: str, model_py: str, config: str | None = None) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(textwrap.dedent(model_py))
    if config is not None:
        (folder / "config.pbtxt").write_text(textwrap.dedent(config))
    return folder


AUTO_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        config.add_input({"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]})
        config.add_output({"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]})
        config.set_max_batch_size(4)
        config.set_dynamic_batching()
        return config

    def initialize(self, args):
        import json
        self.seen = json.loads(args["model_config"])

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
        return out
"""


def _model_function(folder: Path, config_text: str | None = None):
    from torpor.adapters import create_model_function

    from torpor.config import ModelConfig, parse_config_text

    config = parse_config_text(config_text, folder.name) if config_text is not None else ModelConfig(name=folder.name)
    return create_model_function(folder.name, 1, config, folder / "1", folder)


def test_auto_complete_fills_a_bare_config(pb, tmp_path):
    folder = write_model(tmp_path, "auto", AUTO_MODEL)
    fn = _model_function(folder)
    fn.load()
    try:
        c = fn.config
        assert c.backend == "python" and c.max_batch_size == 4 and c.HasField("dynamic_batching")
        assert [(i.name, list(i.dims)) for i in c.input] == [("INPUT0", [4])]
        assert [o.name for o in c.output] == ["OUTPUT0"]
        (instance,) = [m for _, m in fn._instances]
        assert instance.seen["input"][0]["name"] == "INPUT0"  # initialize sees the completed config
    finally:
        fn.unload()


def test_auto_complete_keeps_what_the_config_declares(pb, tmp_path):
    # Triton: a matching config entry stays, max_batch_size becomes the model's when the config's is
    # smaller, and the model's entries are added beside the config's.
    folder = write_model(tmp_path, "auto", AUTO_MODEL)
    fn = _model_function(folder, """
        backend: "python"
        max_batch_size: 2
        input [{ name: "EXTRA" data_type: TYPE_INT32 dims: [1] }]
        output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [4] }]
    """)
    fn.load()
    try:
        assert fn.config.max_batch_size == 4
        assert [i.name for i in fn.config.input] == ["EXTRA", "INPUT0"]
        assert [o.name for o in fn.config.output] == ["OUTPUT0"]
    finally:
        fn.unload()


@pytest.mark.parametrize("config, message", [
    ("max_batch_size: 8",
     ("configuration specified max_batch_size 8, but in auto-complete-config function for model 'auto' "
      "specified max_batch_size 4")),
    ('input [{ name: "INPUT0" data_type: TYPE_INT32 dims: [4] }]',
     ("unable to load model 'auto', configuration expects datatype TYPE_INT32 for input 'INPUT0', "
      "model provides TYPE_FP32")),
    ('output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [5] }]',
     "model 'auto', tensor 'OUTPUT0': the model expects dims [4] but the model configuration specifies dims [5]"),
    ("sequence_batching {}",
     ("Configuration specified scheduling_choice as 'sequence_batching', but auto-complete-config function "
      "for model 'auto' tries to set scheduling_choice as 'dynamic_batching'")),
])
def test_auto_complete_refuses_conflicts(pb, tmp_path, config, message):
    """Triton 2.51's texts for each conflict (the model fails to load)."""
    folder = write_model(tmp_path, "auto", AUTO_MODEL)
    fn = _model_function(folder, 'backend: "python"\n' + config)
    with pytest.raises(ValueError) as e:
        fn.load()
    assert str(e.value) == message


def test_model_config_helper_rules(pb):
    config = pb.ModelConfig(json.dumps({"name": "m", "max_batch_size": 0, "input": [], "output": []}))
    with pytest.raises(ValueError, match="contains property other than 'name', 'data_type', 'dims' and 'optional'"):
        config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [1], "format": "FORMAT_NONE"})
    with pytest.raises(ValueError, match="output 'Y' in auto-complete-config function for model 'm' is missing 'dims'"):
        config.add_output({"name": "Y", "data_type": "TYPE_FP32"})
    config.set_model_transaction_policy({"decoupled": True})
    with pytest.raises(ValueError, match="trying to change decoupled property"):
        config.set_model_transaction_policy({"decoupled": False})
    config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [1], "optional": True})
    config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [1]})  # the same again: kept once
    assert config.as_dict()["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": [1], "optional": True}]


def test_auto_complete_must_return_the_config(pb, tmp_path):
    folder = write_model(tmp_path, "nothing", """
        class TritonPythonModel:
            @staticmethod
            def auto_complete_config(config):
                config.set_max_batch_size(2)

            def execute(self, requests):
                return []
    """)
    fn = _model_function(folder)
    with pytest.raises(Exception, match="auto_complete_config function in model 'nothing' must return a valid "
                                        "pb.ModelConfig object."):
        fn.load()


def test_served_without_config_pbtxt(start_server, tmp_path):
    """Over the server: the folder has no config.pbtxt; the index, the config and inference use
    what auto_complete_config filled in. With --strict-model-config true (Triton's
    --disable-auto-complete-config) it does not load."""
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    write_model(repo, "auto", AUTO_MODEL)
    s = start_server(repo)
    with httpclient.InferenceServerClient(s.http_url) as client:
        config = client.get_model_config("auto")
        assert config["max_batch_size"] == 4 and config["backend"] == "python"
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("INPUT0", "TYPE_FP32", [4])]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("auto", [inp]).as_numpy("OUTPUT0"), x * 2)
    strict = start_server(repo, "--strict-model-config", "true", "--exit-on-error", "false")
    with httpclient.InferenceServerClient(strict.http_url) as client:
        assert not client.is_model_ready("auto")
        (entry,) = client.get_model_repository_index()
        assert "config.pbtxt" in entry["reason"]


def test_bls_names_given_as_bytes(pb):
    """Triton's binding takes bytes for names: the bls_sync example passes `as_numpy()[0]` of a
    BYTES input as the model name."""
    from torpor.adapters.bls import infer_request

    name = np.array([b"add_sub"], dtype=np.object_)[0]
    t = pb.Tensor(b"INPUT0", np.zeros(2, np.float32))
    request = pb.InferenceRequest(model_name=name, requested_output_names=[b"OUTPUT0"], inputs=[t], request_id=b"7")
    assert (request.model_name(), request.requested_output_names(), request.request_id()) == ("add_sub", ["OUTPUT0"], "7")
    assert t.name() == "INPUT0"
    engine_request = infer_request(request)
    assert engine_request.model_name == "add_sub" and engine_request.outputs[0].name == "OUTPUT0"


# custom metrics -----------------------------------------------------------------------------


def _exposition(families) -> str:
    from prometheus_client.core import CollectorRegistry
    from torpor.api.prometheus import render

    class Source:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Source())
    return render(registry).decode()


def test_custom_metrics_kinds_and_exposition(pb):
    from torpor.adapters.python_backend import custom_metric_families

    counter = pb.MetricFamily(name="t_requests", description="requests seen", kind=pb.MetricFamily.COUNTER)
    gauge = pb.MetricFamily(name="t_queue", description="queue length", kind=pb.MetricFamily.GAUGE)
    histogram = pb.MetricFamily(name="t_latency", description="latency", kind=pb.MetricFamily.HISTOGRAM)
    c = counter.Metric(labels={"model": "m", "version": "1"})
    c.increment(2)
    c.increment(3)
    unlabelled = counter.Metric()
    unlabelled.increment(1)
    g = gauge.Metric(labels={"model": "m"})
    g.set(7.5)
    g.increment(-2)
    h = histogram.Metric(labels={"model": "m"}, buckets=[0.5, 1.0, 2.5])
    for v in (0.7, 3.0):
        h.observe(v)
    assert (c.value(), unlabelled.value(), g.value()) == (5.0, 1.0, 5.5)
    # a second family object of the same name and kind is the same family; same labels, same metric
    again = pb.MetricFamily(name="t_requests", description="other words", kind=pb.MetricFamily.COUNTER)
    again.Metric(labels={"version": "1", "model": "m"}).increment(1)
    assert c.value() == 6.0

    text = _exposition(custom_metric_families())
    for line in [
        "# HELP t_requests requests seen",
        "# TYPE t_requests counter",
        't_requests{model="m",version="1"} 6',
        "t_requests 1",
        "# TYPE t_queue gauge",
        't_queue{model="m"} 5.5',
        "# TYPE t_latency histogram",
        't_latency_count{model="m"} 2',
        't_latency_sum{model="m"} 3.7',
        't_latency_bucket{model="m",le="0.5"} 0',
        't_latency_bucket{model="m",le="1"} 1',
        't_latency_bucket{model="m",le="2.5"} 1',
        't_latency_bucket{model="m",le="+Inf"} 2',
    ]:
        assert line + "\n" in text, line
    del counter, gauge, histogram, again


def test_custom_metrics_refusals(pb):
    """Triton 2.51's texts (without the stub's 'Failed to process the request for model ...'
    wrapper: Torpor runs the model in process)."""
    counter = pb.MetricFamily(name="r_counter", description="c", kind=pb.MetricFamily.COUNTER)
    gauge = pb.MetricFamily(name="r_gauge", description="g", kind=pb.MetricFamily.GAUGE)
    histogram = pb.MetricFamily(name="r_hist", description="h", kind=pb.MetricFamily.HISTOGRAM)
    c, g = counter.Metric(), gauge.Metric()
    h = histogram.Metric(buckets=[1.0])
    cases = [
        (lambda: c.increment(-1), ("Failed to increment metric value: TRITONSERVER_METRIC_KIND_COUNTER can only "
                                   "be incremented monotonically by non-negative values.")),
        (lambda: c.set(1), "Failed to set metric value: TRITONSERVER_METRIC_KIND_COUNTER does not support Set"),
        (lambda: g.observe(1), "Failed to observe metric value: TRITONSERVER_METRIC_KIND_GAUGE does not support Observe"),
        (lambda: h.increment(1), ("Failed to increment metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not "
                                  "support Increment")),
        (lambda: h.value(), "Failed to get metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Value"),
        (lambda: histogram.Metric(labels={"a": "b"}), "Failed to create metric. Missing required buckets."),
        (lambda: counter.Metric(buckets=[1.0]), "Failed to create metric. Unexpected buckets found."),
        (lambda: counter.Metric(labels=[("a", "b")]), "Failed to create metric. Labels must be a dictionary."),
        (lambda: histogram.Metric(buckets=(1.0,)), "Failed to create metric. Buckets must be a list."),
        (lambda: histogram.Metric(labels={"x": "1"}, buckets=[2.0, 1.0]),
         "Error when creating Metric: Bucket Boundaries must be strictly sorted"),
        (lambda: pb.MetricFamily(name="r_counter", description="c", kind=pb.MetricFamily.GAUGE),
         "Error when creating MetricFamily: Family name already exists with different type"),
        (lambda: pb.MetricFamily(name="bad name", description="c", kind=pb.MetricFamily.GAUGE),
         "Error when creating MetricFamily: Invalid metric name"),
        # Triton aborts the whole server when a custom family takes one of its own names
        (lambda: pb.MetricFamily(name="nv_inference_count", description="c", kind=pb.MetricFamily.COUNTER),
         "Error when creating MetricFamily: metric name 'nv_inference_count'"),
    ]
    for call, message in cases:
        with pytest.raises(pb.TritonModelException) as e:
            call()
        assert str(e.value).startswith(message), (str(e.value), message)
    with pytest.raises(TypeError):
        c.increment("1")
    orphan = pb.MetricFamily(name="r_orphan", description="o", kind=pb.MetricFamily.GAUGE).Metric()
    gc.collect()
    with pytest.raises(pb.TritonModelException, match="the corresponding 'MetricFamily' has been deleted"):
        orphan.value()


def test_custom_metrics_on_the_metrics_port(start_server, tmp_path):
    """A model's metrics appear on the server's /metrics under their own names."""
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    write_model(repo, "counting", """
        import numpy as np
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def initialize(self, args):
                self.family = pb_utils.MetricFamily(name="counting_calls", description="execute calls",
                                                    kind=pb_utils.MetricFamily.COUNTER)
                self.calls = self.family.Metric(labels={"model": args["model_name"]})
                self.sizes = pb_utils.MetricFamily(name="counting_sizes", description="input sizes",
                                                   kind=pb_utils.MetricFamily.HISTOGRAM)
                self.size = self.sizes.Metric(labels={}, buckets=[1.0, 4.0])

            def execute(self, requests):
                self.calls.increment(1)
                out = []
                for r in requests:
                    x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
                    self.size.observe(x.size)
                    out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
                return out
    """, """
        backend: "python"
        input [{ name: "X" data_type: TYPE_INT32 dims: [-1] }]
        output [{ name: "Y" data_type: TYPE_INT32 dims: [-1] }]
    """)
    s = start_server(repo)
    with httpclient.InferenceServerClient(s.http_url) as client:
        for n in (1, 3, 9):
            x = httpclient.InferInput("X", [n], "INT32")
            x.set_data_from_numpy(np.zeros(n, np.int32))
            client.infer("counting", [x])
    with urllib.request.urlopen(s.metrics_url, timeout=10) as r:
        text = r.read().decode()
    assert "# TYPE counting_calls counter\n" in text
    assert 'counting_calls{model="counting"} 3\n' in text
    assert "counting_sizes_count 3\n" in text and 'counting_sizes_bucket{le="4"} 2\n' in text
    assert 'nv_inference_request_success{model="counting",version="1"} 3\n' in text


# decoupled async execute -------------------------------------------------------------------


class Emitted:
    def __init__(self):
        self.items = []
        self.final = threading.Event()

    def __call__(self, outputs, error, final):
        self.items.append((outputs, error, final))
        if final:
            self.final.set()


def test_decoupled_async_execute_frees_the_instance(pb, tmp_path):
    """As Triton's python backend: a decoupled model's `async def execute` is left running on the
    instance's event loop; `execute_decoupled` returns at once, so one instance serves several
    requests whose coroutines await together. A coroutine that raises fails its request."""
    from torpor.model import ModelRequest

    folder = write_model(tmp_path, "slow", """
        import asyncio
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def initialize(self, args):
                self.release = None

            async def execute(self, requests):
                if self.release is None:
                    self.release = asyncio.Event()
                (request,) = requests
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                if x[0] < 0:
                    raise ValueError("negative")
                if x[0] == 0:
                    self.release.set()
                else:
                    await self.release.wait()
                sender = request.get_response_sender()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    """)
    fn = _model_function(folder, """
        backend: "python"
        model_transaction_policy { decoupled: true }
        input [{ name: "X" data_type: TYPE_INT32 dims: [1] }]
        output [{ name: "Y" data_type: TYPE_INT32 dims: [1] }]
        instance_group [{ count: 1 kind: KIND_CPU }]
    """)
    fn.load()
    try:
        waiting = [Emitted() for _ in range(3)]
        for i, emit in enumerate(waiting, start=1):  # each returns while its coroutine awaits
            fn.execute_decoupled(ModelRequest(inputs={"X": np.array([i], np.int32)}, requested_outputs=[]), emit)
        time.sleep(0.1)
        assert not any(e.final.is_set() for e in waiting)
        releasing = Emitted()
        fn.execute_decoupled(ModelRequest(inputs={"X": np.array([0], np.int32)}, requested_outputs=[]), releasing)
        for i, emit in enumerate([releasing, *waiting]):
            assert emit.final.wait(10)
            ((outputs, error, final),) = emit.items
            assert error is None and final and outputs["Y"].tolist() == [i]
        failing = Emitted()
        fn.execute_decoupled(ModelRequest(inputs={"X": np.array([-1], np.int32)}, requested_outputs=[]), failing)
        assert failing.final.wait(10)
        ((outputs, error, final),) = failing.items
        assert outputs is None and final and "ValueError: negative" in str(error)
    finally:
        fn.unload()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drive", nargs=2, metavar=("REPO", "RESULT"), required=True)
    parser.add_argument("--netns", action="store_true", help="inside a fresh network namespace: bring lo up")
    parser.add_argument("clients", nargs="*")
    args = parser.parse_args()
    sys.exit(drive(args.drive[0], args.drive[1], args.clients, args.netns))
