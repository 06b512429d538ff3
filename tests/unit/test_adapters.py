"""Adapters, loaded directly (no engine, no server): the bundled example models, the Triton
Python backend API, TorchScript and PyTorch eager models, and the example networks."""

from __future__ import annotations

import gc
import json
import shutil
import textwrap
import threading
import time
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from torpor.adapters import create_model_function

from torpor.config import parse_config_text, read_config
from torpor.errors import Status, TorporError
from torpor.model import SEQUENCE_END, SEQUENCE_START, ModelRequest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "models"


def load(model_dir: Path, version: int = 1):
    config = read_config(model_dir)
    model = create_model_function(model_dir.name, version, config, model_dir / str(version), model_dir)
    model.load()
    return model


@pytest.fixture
def example():
    loaded = []

    def _load(name: str):
        model = load(EXAMPLES / name)
        loaded.append(model)
        return model

    yield _load
    for model in loaded:
        model.unload()


def make_model(tmp_path: Path, name: str, config: str, files: dict[str, str] | None = None) -> Path:
    model_dir = tmp_path / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config))
    for rel, text in (files or {}).items():
        (model_dir / rel).write_text(textwrap.dedent(text))
    return model_dir


def run_one(model, inputs, outputs=(), **kwargs):
    (result,) = model.execute([ModelRequest(inputs=inputs, requested_outputs=list(outputs), **kwargs)])
    return result


def strings(values) -> np.ndarray:
    values = np.asarray(values)
    out = np.empty(values.shape, dtype=np.object_)
    out.reshape(-1)[:] = [str(v).encode() for v in values.reshape(-1)]
    return out


class Collector:
    """An `emit` callback that records what a decoupled model sends."""

    def __init__(self):
        self.items: list[tuple[dict | None, Exception | None, bool]] = []
        self.final = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, outputs, error, final):
        with self.lock:
            self.items.append((outputs, error, final))
        if final:
            self.final.set()

    def wait(self, timeout=10.0):
        assert self.final.wait(timeout), f"no final response; got {self.items}"
        time.sleep(0.02)  # anything sent after the final flag would show up here
        return self.items


# ------------------------------------------------------------------------------------------
# the bundled simple models
# ------------------------------------------------------------------------------------------


def test_simple_add_sub(example):
    model = example("simple")
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    out = run_one(model, {"INPUT0": in0, "INPUT1": in1}, ["OUTPUT0", "OUTPUT1"])
    assert out["OUTPUT0"].dtype == np.int32 and out["OUTPUT0"].shape == (1, 16)
    np.testing.assert_array_equal(out["OUTPUT0"], in0 + in1)
    np.testing.assert_array_equal(out["OUTPUT1"], in0 - in1)


def test_simple_batch_of_requests_and_requested_outputs(example):
    model = example("simple")
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    big = np.full((1, 16), np.iinfo(np.int32).max, dtype=np.int32)
    results = model.execute(
        [
            ModelRequest({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"]),
            ModelRequest({"INPUT0": big, "INPUT1": np.ones((1, 16), np.int32)}, ["OUTPUT0", "OUTPUT1"]),
        ]
    )
    assert set(results[0]) == {"OUTPUT1"}
    np.testing.assert_array_equal(results[0]["OUTPUT1"], a - b)
    assert results[1]["OUTPUT0"][0, 0] == np.iinfo(np.int32).min  # wraps like int32 arithmetic


def test_simple_read_only_inputs(example):
    # Inputs decoded from a request body are read-only numpy views.
    model = example("simple")
    buf = np.arange(16, dtype=np.int32).tobytes()
    in0 = np.frombuffer(buf, dtype=np.int32).reshape(1, 16)
    out = run_one(model, {"INPUT0": in0, "INPUT1": in0}, ["OUTPUT0"])
    np.testing.assert_array_equal(out["OUTPUT0"], in0 * 2)


def test_simple_int8(example):
    model = example("simple_int8")
    in0 = np.arange(16, dtype=np.int8).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int8)
    out = run_one(model, {"INPUT0": in0, "INPUT1": in1}, ["OUTPUT0", "OUTPUT1"])
    assert out["OUTPUT0"].dtype == np.int8
    np.testing.assert_array_equal(out["OUTPUT0"], in0 + in1)
    np.testing.assert_array_equal(out["OUTPUT1"], in0 - in1)


def test_simple_string(example):
    model = example("simple_string")
    in0 = np.arange(16).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int64)
    out = run_one(model, {"INPUT0": strings(in0), "INPUT1": strings(in1)}, ["OUTPUT0", "OUTPUT1"])
    assert out["OUTPUT0"].dtype == np.object_ and out["OUTPUT0"].shape == (1, 16)
    assert all(isinstance(x, bytes) for x in out["OUTPUT0"].flat)
    np.testing.assert_array_equal(out["OUTPUT0"].astype(np.int64), in0 + in1)
    np.testing.assert_array_equal(out["OUTPUT1"].astype(np.int64), in0 - in1)


def test_simple_string_rejects_non_numbers(example):
    model = example("simple_string")
    bad = strings(np.arange(16).reshape(1, 16))
    bad[0, 3] = b"three"
    result = run_one(model, {"INPUT0": bad, "INPUT1": bad})
    assert isinstance(result, TorporError) and result.status == Status.INVALID_ARG
    assert "decimal" in result.message


def test_simple_identity(example):
    model = example("simple_identity")
    with_nul = np.array([b"he\x00llo"] * 16, dtype=np.object_).reshape(1, 16)
    out = run_one(model, {"INPUT0": with_nul}, ["OUTPUT0"])
    np.testing.assert_array_equal(out["OUTPUT0"], with_nul)
    blobs = np.array([b"\x00\x01\x02\x03"] * 6, dtype=np.object_).reshape(2, 3)
    np.testing.assert_array_equal(run_one(model, {"INPUT0": blobs})["OUTPUT0"], blobs)


def _sequence(model, values, corrid, dyna):
    """Drive a sequence as the engine would, filling the control inputs per request."""
    outputs = []
    for i, value in enumerate(values):
        start, end = int(i == 0), int(i == len(values) - 1)
        inputs = {
            "INPUT": np.full((1, 1), value, dtype=np.int32),
            "START": np.array([[start]], dtype=np.int32),
            "READY": np.array([[1]], dtype=np.int32),
        }
        if dyna:
            inputs["END"] = np.array([[end]], dtype=np.int32)
            inputs["CORRID"] = np.array([[corrid]], dtype=np.uint64)
        flags = (SEQUENCE_START if start else 0) | (SEQUENCE_END if end else 0)
        out = run_one(model, inputs, ["OUTPUT"], correlation_id=corrid, flags=flags)
        assert out["OUTPUT"].dtype == np.int32 and out["OUTPUT"].shape == (1, 1)
        outputs.append(int(out["OUTPUT"][0, 0]))
    return outputs


def test_simple_sequence_matches_triton_example(example):
    # What simple_http_sequence_sync_infer_client.py checks.
    model = example("simple_sequence")
    values = [11, 7, 5, 3, 2, 0, 1]
    assert _sequence(model, [0] + values, 1000, dyna=False) == [1] + values
    assert _sequence(model, [100] + [-v for v in values], 1001, dyna=False) == [101] + [-v for v in values]
    not_ready = {
        "INPUT": np.array([[5], [6]], dtype=np.int32),
        "START": np.array([[0], [1]], dtype=np.int32),
        "READY": np.array([[0], [1]], dtype=np.int32),
    }
    np.testing.assert_array_equal(run_one(model, not_ready)["OUTPUT"], [[0], [7]])


def test_simple_dyna_sequence_matches_triton_example(example):
    # The -d variant: the last request adds the correlation id.
    model = example("simple_dyna_sequence")
    values = [11, 7, 5, 3, 2, 0, 1]
    assert _sequence(model, [0] + values, 1000, dyna=True) == [1] + values[:-1] + [1 + 1000]
    assert _sequence(model, [100] + [-v for v in values], 1001, dyna=True) == (
        [101] + [-v for v in values[:-1]] + [-1 + 1001]
    )


def test_simple_string_dyna_sequence_accumulates(example):
    # What the -d variants of the sequence clients check for the string correlation id.
    model = example("simple_string_dyna_sequence")
    values = [20] + [-v for v in [11, 7, 5, 3, 2, 0, 1]]

    def step(value, corrid, start, end, ready=1):
        inputs = {
            "INPUT": np.full((1, 1), value, dtype=np.int32),
            "START": np.array([[start]], dtype=np.int32),
            "END": np.array([[end]], dtype=np.int32),
            "READY": np.array([[ready]], dtype=np.int32),
            "CORRID": np.array([[corrid.encode()]], dtype=np.object_),
        }
        return int(run_one(model, inputs, ["OUTPUT"])["OUTPUT"][0, 0])

    got = [step(v, "1002", int(i == 0), int(i == len(values) - 1)) for i, v in enumerate(values)]
    expected = list(np.cumsum(values))
    expected[-1] += 1002
    assert got == expected
    # sequences are independent, and END forgets the state
    assert step(5, "7", 1, 0) == 5
    assert step(1, "8", 1, 0) == 1
    assert step(2, "7", 0, 1) == 7 + 7
    assert step(3, "7", 1, 0) == 3
    assert step(9, "8", 0, 0, ready=0) == 0
    bad = run_one(
        model,
        {
            "INPUT": np.ones((1, 1), np.int32),
            "START": np.ones((1, 1), np.int32),
            "END": np.ones((1, 1), np.int32),
            "READY": np.ones((1, 1), np.int32),
            "CORRID": np.array([[b"abc"]], dtype=np.object_),
        },
    )
    assert isinstance(bad, TorporError) and bad.status == Status.INVALID_ARG


def test_repeat_int32(example):
    # What simple_grpc_custom_repeat.py checks, with shorter delays.
    model = example("repeat_int32")
    assert model.decoupled
    n = 10
    collector = Collector()
    started = time.monotonic()
    model.execute_decoupled(
        ModelRequest(
            {
                "IN": np.arange(100, 100 + n, dtype=np.int32),
                "DELAY": np.full(n, 5, dtype=np.uint32),
                "WAIT": np.array([50], dtype=np.uint32),
            },
            ["OUT", "IDX"],
        ),
        collector,
    )
    items = collector.wait()
    elapsed = time.monotonic() - started
    assert len(items) == n + 1
    assert [final for _, _, final in items] == [False] * n + [True]
    assert all(err is None for _, err, _ in items)
    assert [int(o["OUT"][0]) for o, _, _ in items[:n]] == list(range(100, 100 + n))
    assert [int(o["IDX"][0]) for o, _, _ in items[:n]] == list(range(n))
    assert items[0][0]["OUT"].shape == (1,) and items[0][0]["IDX"].dtype == np.uint32
    assert items[-1][0] is None
    assert elapsed >= (n * 5 + 50) / 1000 * 0.9


def test_repeat_int32_empty_and_requested_outputs(example):
    model = example("repeat_int32")
    collector = Collector()
    model.execute_decoupled(
        ModelRequest(
            {
                "IN": np.zeros(0, dtype=np.int32),
                "DELAY": np.zeros(0, dtype=np.uint32),
                "WAIT": np.zeros(1, dtype=np.uint32),
            },
            ["OUT"],
        ),
        collector,
    )
    assert collector.wait() == [(None, None, True)]
    collector = Collector()
    model.execute_decoupled(
        ModelRequest(
            {
                "IN": np.array([7, 8], np.int32),
                "DELAY": np.zeros(2, np.uint32),
                "WAIT": np.zeros(1, np.uint32),
            },
            ["OUT"],
        ),
        collector,
    )
    items = collector.wait()
    assert [set(o) for o, _, _ in items[:2]] == [{"OUT"}, {"OUT"}]


def test_repeat_int32_concurrent_requests(example):
    model = example("repeat_int32")
    collectors = [Collector() for _ in range(4)]
    for k, collector in enumerate(collectors):
        model.execute_decoupled(
            ModelRequest(
                {
                    "IN": np.full(3, k, np.int32),
                    "DELAY": np.full(3, 10, np.uint32),
                    "WAIT": np.zeros(1, np.uint32),
                },
                [],
            ),
            collector,
        )
    for k, collector in enumerate(collectors):
        items = collector.wait()
        assert len(items) == 4 and items[-1][2]
        assert [int(o["OUT"][0]) for o, _, _ in items[:3]] == [k, k, k]


def test_bundled_repository_configs():
    names = sorted(p.name for p in EXAMPLES.iterdir() if (p / "config.pbtxt").exists())
    assert names == [
        "bert",
        "repeat_int32",
        "resnet50",
        "simple",
        "simple_dyna_sequence",
        "simple_identity",
        "simple_int8",
        "simple_sequence",
        "simple_string",
        "simple_string_dyna_sequence",
    ]
    for name in names:
        config = read_config(EXAMPLES / name)
        assert config.name == name
        assert [g.kind for g in config.instance_group] == [config.instance_group[0].KIND_CPU]
        assert (EXAMPLES / name / "1").is_dir()


# ------------------------------------------------------------------------------------------
# Python backend API
# ------------------------------------------------------------------------------------------

PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [
  { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 2 } ]
parameters { key: "greeting" value: { string_value: "hi" } }
"""

PROBE_MODEL = """
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from .helper import double


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        self.config = json.loads(args["model_config"])
        with open(os.path.join(args["model_repository"], "initialized.txt"), "a") as f:
            f.write(args["model_instance_name"] + "\\n")

    def execute(self, requests):
        responses = []
        for request in requests:
            mode = json.loads(request.parameters()).get("mode", "ok")
            if mode == "raise":
                raise ValueError("asked to fail")
            if mode == "error":
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("bad input", pb_utils.TritonError.INVALID_ARG)))
                continue
            if mode == "count":
                return responses
            x = pb_utils.get_input_tensor_by_name(request, "IN")
            info = {
                "args": self.args,
                "greeting": self.config["parameters"]["greeting"]["string_value"],
                "out_type": pb_utils.get_output_config_by_name(self.config, "OUT")["data_type"],
                "in_dims": pb_utils.get_input_config_by_name(self.config, "IN")["dims"],
                "requested": request.requested_output_names(),
                "request_id": request.request_id(),
                "correlation_id": request.correlation_id(),
                "flags": request.flags(),
                "parameters": json.loads(request.parameters()),
                "dtype": x.triton_dtype(),
                "shape": x.shape(),
                "is_cpu": x.is_cpu(),
                "decoupled": pb_utils.using_decoupled_model_transaction_policy(self.config),
            }
            out = pb_utils.Tensor("OUT", double(x.as_numpy()))
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                out, pb_utils.Tensor("INFO", np.array([json.dumps(info)], dtype=np.object_))]))
        return responses

    def finalize(self):
        with open(os.path.join(self.args["model_repository"], "finalized.txt"), "a") as f:
            f.write(self.args["model_instance_name"] + "\\n")
"""


@pytest.fixture
def probe(tmp_path):
    model_dir = make_model(
        tmp_path,
        "probe",
        PROBE_CONFIG,
        {"1/model.py": PROBE_MODEL, "1/helper.py": "def double(x):\n    return x * 2\n"},
    )
    model = load(model_dir)
    yield model, model_dir
    model.unload()


def test_python_backend_initialize_args_and_request_api(probe):
    model, model_dir = probe
    assert sorted((model_dir / "initialized.txt").read_text().split()) == ["probe_0_0", "probe_0_1"]
    x = np.array([1.5, -2.0], dtype=np.float32)
    out = run_one(
        model,
        {"IN": x},
        ["OUT", "INFO"],
        parameters={"mode": "ok", "n": 3},
        id="req-7",
        correlation_id=42,
        flags=SEQUENCE_START,
    )
    np.testing.assert_array_equal(out["OUT"], x * 2)
    info = json.loads(out["INFO"][0])
    args = info["args"]
    assert args["model_name"] == "probe" and args["model_version"] == "1"
    assert args["model_repository"] == str(model_dir)
    assert args["model_instance_kind"] == "CPU" and args["model_instance_device_id"] == "0"
    assert args["model_instance_name"] in ("probe_0_0", "probe_0_1")
    assert json.loads(args["model_config"])["max_batch_size"] == 0
    assert info["greeting"] == "hi" and info["out_type"] == "TYPE_FP32" and info["in_dims"] == [-1]
    assert info["requested"] == ["OUT", "INFO"]
    assert info["request_id"] == "req-7" and info["correlation_id"] == 42
    assert info["flags"] == SEQUENCE_START
    assert info["parameters"] == {"mode": "ok", "n": 3}
    assert info["dtype"] == 11 and info["shape"] == [2] and info["is_cpu"] and not info["decoupled"]


def test_python_backend_filters_to_requested_outputs(probe):
    model, _ = probe
    out = run_one(model, {"IN": np.ones(3, np.float32)}, ["OUT"])
    assert set(out) == {"OUT"}
    out = run_one(model, {"IN": np.ones(3, np.float32)}, [])
    assert set(out) == {"OUT", "INFO"}
    assert json.loads(out["INFO"][0])["requested"] == ["OUT", "INFO"]  # none asked: all outputs


def test_python_backend_errors(probe):
    model, _ = probe
    ok = ModelRequest({"IN": np.ones(1, np.float32)}, ["OUT"])
    error = ModelRequest({"IN": np.ones(1, np.float32)}, ["OUT"], parameters={"mode": "error"})
    first, second = model.execute([ok, error])
    assert isinstance(first, dict)
    assert isinstance(second, TorporError) and second.status == Status.INVALID_ARG
    assert second.message == "bad input"

    raising = ModelRequest({"IN": np.ones(1, np.float32)}, [], parameters={"mode": "raise"})
    results = model.execute([ok, raising])
    assert all(isinstance(r, TorporError) and r.status == Status.INTERNAL for r in results)
    assert "ValueError: asked to fail" in results[0].message
    assert "probe_0_" in results[0].message

    counted = model.execute(
        [ok, ModelRequest({"IN": np.ones(1, np.float32)}, [], parameters={"mode": "count"})]
    )
    assert all(isinstance(r, TorporError) for r in counted)
    assert "do not match" in counted[0].message


def test_python_backend_finalize_on_unload(tmp_path):
    model_dir = make_model(
        tmp_path,
        "probe",
        PROBE_CONFIG,
        {"1/model.py": PROBE_MODEL, "1/helper.py": "def double(x):\n    return x * 2\n"},
    )
    model = load(model_dir)
    model.unload()
    assert sorted((model_dir / "finalized.txt").read_text().split()) == ["probe_0_0", "probe_0_1"]


def test_python_backend_initialize_failure(tmp_path):
    model_dir = make_model(
        tmp_path,
        "broken",
        'name: "broken"\nbackend: "python"\n',
        {
            "1/model.py": """
            class TritonPythonModel:
                def initialize(self, args):
                    raise RuntimeError("no weights here")
            """
        },
    )
    with pytest.raises(Exception, match="no weights here"):
        load(model_dir)
    missing = make_model(tmp_path, "missing", 'name: "missing"\nbackend: "python"\n')
    with pytest.raises(FileNotFoundError):
        load(missing)


def test_python_backend_response_sender_in_non_decoupled_model(tmp_path):
    model_dir = make_model(
        tmp_path,
        "sender",
        """
        name: "sender"
        backend: "python"
        input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
        output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
        """,
        {
            "1/model.py": """
            import threading
            import triton_python_backend_utils as pb_utils

            class TritonPythonModel:
                def execute(self, requests):
                    for request in requests:
                        x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
                        sender = request.get_response_sender()
                        def later(sender=sender, x=x):
                            sender.send(
                                pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x + 1)]),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                            )
                        threading.Timer(0.05, later).start()
                    return None
            """
        },
    )
    model = load(model_dir)
    results = model.execute(
        [ModelRequest({"IN": np.array([1], np.int32)}, []), ModelRequest({"IN": np.array([5], np.int32)}, [])]
    )
    assert [int(r["OUT"][0]) for r in results] == [2, 6]
    model.unload()


def test_python_backend_response_sender_made_on_demand(tmp_path):
    """Senders are made only when asked for: a model that returns None without sending fails
    its request; one that kept the request may ask for the sender later, from another thread."""
    model_dir = make_model(
        tmp_path,
        "lazy",
        """
        name: "lazy"
        backend: "python"
        input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
        output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
        """,
        {
            "1/model.py": """
            import threading
            import triton_python_backend_utils as pb_utils

            class TritonPythonModel:
                def execute(self, requests):
                    mode = int(pb_utils.get_input_tensor_by_name(requests[0], "IN").as_numpy()[0])
                    if mode == 0:  # neither a response nor a sender
                        return None
                    if mode == 1:  # keep the request; ask for its sender later
                        request = requests[0]
                        def later():
                            x = request.inputs()[0].as_numpy()
                            request.get_response_sender().send(
                                pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x + 1)]),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                            )
                        threading.Timer(0.05, later).start()
                        return None
                    # ask for a sender, never use it, return the response directly
                    assert requests[0].get_response_sender() is requests[0].get_response_sender()
                    x = requests[0].inputs()[0].as_numpy()
                    return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x)])]
            """
        },
    )
    model = load(model_dir)
    none = run_one(model, {"IN": np.array([0], np.int32)})
    assert isinstance(none, TorporError) and "sent no response" in none.message
    assert int(run_one(model, {"IN": np.array([1], np.int32)})["OUT"][0]) == 2
    assert int(run_one(model, {"IN": np.array([2], np.int32)})["OUT"][0]) == 2
    model.unload()


def test_python_backend_async_execute(tmp_path):
    """`async def execute` runs to completion on the worker thread's own event loop."""
    model_dir = make_model(
        tmp_path,
        "aexec",
        """
        name: "aexec"
        backend: "python"
        input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]
        output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
        """,
        {
            "1/model.py": """
            import asyncio
            import triton_python_backend_utils as pb_utils

            class TritonPythonModel:
                async def execute(self, requests):
                    await asyncio.sleep(0.001)
                    x = pb_utils.get_input_tensor_by_name(requests[0], "IN").as_numpy()
                    if int(x[0]) < 0:
                        raise ValueError("negative")
                    return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 3)])]
            """
        },
    )
    model = load(model_dir)
    results = []
    threads = [
        threading.Thread(target=lambda v=v: results.append(run_one(model, {"IN": np.array([v], np.int32)})))
        for v in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(r["OUT"][0]) for r in results) == [3, 6]
    failed = run_one(model, {"IN": np.array([-1], np.int32)})
    assert isinstance(failed, TorporError) and "ValueError: negative" in failed.message
    model.unload()


DECOUPLED_MODEL = """
import threading
import numpy as np
import triton_python_backend_utils as pb_utils

KEPT = []

class TritonPythonModel:
    def execute(self, requests):
        (request,) = requests
        mode = int(pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()[0])
        sender = request.get_response_sender()
        if mode == 0:  # one response, then forget the request without a final flag
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([1], np.int32))]))
            return None
        if mode == 1:  # raise before sending anything
            raise KeyError("boom")
        if mode == 2:  # error response as the final one; later sends must fail
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("nope")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            try:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except pb_utils.TritonModelException as e:
                KEPT.append(str(e))
            return None
        if mode == 3:  # returning responses is not allowed in decoupled mode
            return [pb_utils.InferenceResponse([])]
        if mode == 4:  # keep the sender, finish from a thread much later
            KEPT.append(sender)
            def finish():
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([4], np.int32))]))
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            threading.Timer(0.1, finish).start()
            return None
"""


@pytest.fixture
def decoupled(tmp_path):
    model_dir = make_model(
        tmp_path,
        "dec",
        """
        name: "dec"
        backend: "python"
        model_transaction_policy { decoupled: true }
        input [ { name: "MODE" data_type: TYPE_INT32 dims: [ 1 ] } ]
        output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
        """,
        {"1/model.py": DECOUPLED_MODEL},
    )
    model = load(model_dir)
    yield model
    model.unload()


def _decoupled_run(model, mode):
    collector = Collector()
    model.execute_decoupled(ModelRequest({"MODE": np.array([mode], np.int32)}, []), collector)
    gc.collect()
    return collector.wait()


def test_decoupled_final_flag_sent_when_sender_dropped(decoupled):
    items = _decoupled_run(decoupled, 0)
    assert len(items) == 2
    assert int(items[0][0]["OUT"][0]) == 1 and items[0][2] is False
    assert items[1] == (None, None, True)


def test_decoupled_execute_exception(decoupled):
    ((outputs, error, final),) = _decoupled_run(decoupled, 1)
    assert outputs is None and final and isinstance(error, TorporError)
    assert error.status == Status.INTERNAL and "KeyError" in error.message and "boom" in error.message


def test_decoupled_error_response_and_send_after_final(decoupled):
    ((outputs, error, final),) = _decoupled_run(decoupled, 2)
    assert outputs is None and final and error.message == "nope" and error.status == Status.INTERNAL
    module = next(m for name, m in __import__("sys").modules.items() if name.endswith("dec_1.model"))
    assert "closed" in module.KEPT[-1]


def test_decoupled_execute_must_return_none(decoupled):
    ((_, error, final),) = _decoupled_run(decoupled, 3)
    assert final and "must return None" in error.message


def test_decoupled_sends_after_execute_returned(decoupled):
    items = _decoupled_run(decoupled, 4)
    assert [(int(o["OUT"][0]) if o else None, f) for o, _, f in items] == [(4, False), (None, True)]


def test_pb_utils_module_api(monkeypatch):
    import importlib

    import torpor.adapters.python_backend  # noqa: F401 - importing it registers triton_python_backend_utils
    from torpor.adapters import triton_python_backend_utils as ours

    pb_utils = importlib.import_module("triton_python_backend_utils")

    assert pb_utils is ours
    assert pb_utils.triton_string_to_numpy("TYPE_INT32") is np.int32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.numpy_to_triton_type(np.float32) == 11
    assert pb_utils.numpy_to_triton_type(np.object_) == 13
    assert pb_utils.numpy_to_triton_type(np.bytes_) == 13
    assert pb_utils.numpy_to_triton_type(ml_dtypes.bfloat16) == 14
    assert pb_utils.triton_to_numpy_type(8) is np.int32
    assert pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL == 1
    assert (
        pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START,
        pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
    ) == (
        SEQUENCE_START,
        SEQUENCE_END,
    )

    data = np.array([b"a", b"", "h\u00e9".encode(), b"\x00z"], dtype=np.object_)
    packed = pb_utils.serialize_byte_tensor(data)
    assert packed.dtype == np.object_ and packed.item()[:5] == b"\x01\x00\x00\x00a"
    np.testing.assert_array_equal(pb_utils.deserialize_bytes_tensor(packed), data)
    np.testing.assert_array_equal(pb_utils.deserialize_bytes_tensor(packed.item()), data)

    t = pb_utils.Tensor("X", np.arange(6, dtype=np.int16).reshape(2, 3))
    assert (t.name(), t.triton_dtype(), t.shape(), t.is_cpu()) == ("X", 7, [2, 3], True)
    back = pb_utils.Tensor.from_dlpack("Y", t.to_dlpack())
    np.testing.assert_array_equal(back.as_numpy(), t.as_numpy())
    as_torch = torch.from_dlpack(t)
    assert as_torch.dtype == torch.int16 and as_torch.shape == (2, 3)
    bf = pb_utils.Tensor.from_dlpack("B", torch.ones(3, dtype=torch.bfloat16))
    assert bf.triton_dtype() == 14 and bf.as_numpy().dtype == ml_dtypes.bfloat16
    reinterpreted = pb_utils.Tensor("R", np.zeros(4, np.uint8), triton_dtype=pb_utils.TYPE_INT32)
    assert reinterpreted.as_numpy().dtype == np.int32 and reinterpreted.shape() == [1]
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.Tensor("U", np.array(["unicode"]))

    err = pb_utils.TritonError("m")
    assert err.message() == "m" and err.code() == pb_utils.TritonError.INTERNAL
    response = pb_utils.InferenceResponse(output_tensors=[t], error=None, parameters={"k": 1})
    assert pb_utils.get_output_tensor_by_name(response, "X") is t
    assert pb_utils.get_output_tensor_by_name(response, "nope") is None
    assert not response.has_error() and json.loads(response.parameters()) == {"k": 1}
    with pytest.raises(pb_utils.TritonModelException):
        pb_utils.InferenceResponse(output_tensors=t)

    config = {"input": [{"name": "A", "data_type": "TYPE_FP32"}], "output": []}
    assert pb_utils.get_input_config_by_name(config, "A")["data_type"] == "TYPE_FP32"
    assert pb_utils.get_input_config_by_name(config, "B") is None
    assert pb_utils.get_output_config_by_name(config, "A") is None

    monkeypatch.setattr(pb_utils, "_bls_handler", None)  # no server in this process: BLS is unsupported
    bls = pb_utils.InferenceRequest(model_name="other", requested_output_names=["O"], inputs=[t])
    result = bls.exec()
    assert result.has_error() and result.error().code() == pb_utils.TritonError.UNSUPPORTED

    pb_utils.Logger.log_info("info")
    pb_utils.Logger.log_warn("warn")
    pb_utils.Logger.log_verbose("verbose")


def test_python_backend_auto_complete_config(tmp_path):
    model_dir = make_model(
        tmp_path,
        "auto",
        'name: "auto"\nbackend: "python"\n',
        {
            "1/model.py": """
            import triton_python_backend_utils as pb_utils

            class TritonPythonModel:
                @staticmethod
                def auto_complete_config(auto_complete_model_config):
                    auto_complete_model_config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [2]})
                    auto_complete_model_config.add_output(
                        {"name": "Y", "data_type": "TYPE_FP32", "dims": [2]}
                    )
                    auto_complete_model_config.set_max_batch_size(4)
                    return auto_complete_model_config

                def execute(self, requests):
                    responses = []
                    for r in requests:
                        x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
                        responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
                    return responses
            """
        },
    )
    model = load(model_dir)
    assert [i.name for i in model.config.input] == ["X"] and model.config.max_batch_size == 4
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(run_one(model, {"X": x})["Y"], x)
    model.unload()


# ------------------------------------------------------------------------------------------
# adapter selection
# ------------------------------------------------------------------------------------------


def test_unknown_backend_is_a_clear_error(tmp_path):
    config = parse_config_text('name: "m"\nbackend: "tensorrt"\n')
    with pytest.raises(ValueError, match="unsupported backend 'tensorrt'"):
        create_model_function("m", 1, config, tmp_path / "1", tmp_path)
    config = parse_config_text('name: "m"\nplatform: "onnxruntime_onnx"\n')
    with pytest.raises(ValueError, match="onnxruntime_onnx"):
        create_model_function("m", 1, config, tmp_path / "1", tmp_path)
    config = parse_config_text('name: "m"\nbackend: "pytorch"\n')
    with pytest.raises(ValueError, match=r"model\.pt"):
        create_model_function("m", 1, config, tmp_path / "1", tmp_path)


# ------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------


class _AddSub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Linear(4, 4, bias=False)
        torch.nn.init.eye_(self.scale.weight)
        self.register_buffer("offset", torch.zeros(4))

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return self.scale(a) + b + self.offset, a - b


class _Named(torch.nn.Module):
    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": (tokens.to(torch.float32) * weights).sum(-1), "echo": tokens}


def _save_script(module, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))


def test_torchscript_positional_naming(tmp_path):
    model_dir = make_model(
        tmp_path,
        "ts_addsub",
        """
        name: "ts_addsub"
        platform: "pytorch_libtorch"
        max_batch_size: 4
        input [
          { name: "INPUT__1" data_type: TYPE_FP32 dims: [ 4 ] },
          { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }
        ]
        output [
          { name: "OUTPUT__1" data_type: TYPE_FP32 dims: [ 4 ] },
          { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4 ] }
        ]
        """,
    )
    _save_script(_AddSub(), model_dir / "1" / "model.pt")
    model = load(model_dir)
    assert type(model).__name__ == "TorchScriptModelFunction"
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    out = run_one(model, {"INPUT__0": a, "INPUT__1": b}, ["OUTPUT__0", "OUTPUT__1"])
    np.testing.assert_allclose(out["OUTPUT__0"], a + b)
    np.testing.assert_allclose(out["OUTPUT__1"], a - b)
    # two requests run as one batch and are split back
    c = np.full((1, 4), 10, dtype=np.float32)
    r1, r2 = model.execute(
        [
            ModelRequest({"INPUT__0": a, "INPUT__1": b}, ["OUTPUT__0"]),
            ModelRequest({"INPUT__0": c, "INPUT__1": c}, ["OUTPUT__1"]),
        ]
    )
    np.testing.assert_allclose(r1["OUTPUT__0"], a + b)
    np.testing.assert_allclose(r2["OUTPUT__1"], np.zeros((1, 4)))
    assert set(r1) == {"OUTPUT__0"} and set(r2) == {"OUTPUT__1"}
    groups = model.layer_groups()
    assert [g.name for g in groups] == ["_root", "scale"]
    assert sum(g.nbytes for g in groups) == 4 * 4 * 4 + 4 * 4
    model.unload()


def test_torchscript_named_io_with_backend_pytorch(tmp_path):
    model_dir = make_model(
        tmp_path,
        "ts_named",
        """
        name: "ts_named"
        backend: "pytorch"
        max_batch_size: 0
        input [
          { name: "weights" data_type: TYPE_FP32 dims: [ -1 ] },
          { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] }
        ]
        output [
          { name: "echo" data_type: TYPE_INT64 dims: [ -1 ] },
          { name: "total" data_type: TYPE_FP32 dims: [ 1 ] }
        ]
        """,
    )
    _save_script(_Named(), model_dir / "1" / "model.pt")
    model = load(model_dir)
    tokens = np.array([1, 2, 3], dtype=np.int64)
    weights = np.array([1.0, 0.5, 2.0], dtype=np.float32)
    out = run_one(model, {"tokens": tokens, "weights": weights}, ["total", "echo"])
    assert out["total"].dtype == np.float32 and float(out["total"]) == pytest.approx(8.0)
    np.testing.assert_array_equal(out["echo"], tokens)
    assert model.layer_groups() == []
    bad = run_one(model, {"tokens": tokens, "weights": np.ones(2, np.float32)})
    assert isinstance(bad, TorporError) and "PyTorch execute failure" in bad.message


def test_torchscript_bf16_round_trip(tmp_path):
    class Twice(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    model_dir = make_model(
        tmp_path,
        "ts_bf16",
        """
        name: "ts_bf16"
        platform: "pytorch_libtorch"
        default_model_filename: "twice.pt"
        input [ { name: "INPUT__0" data_type: TYPE_BF16 dims: [ 3 ] } ]
        output [ { name: "OUTPUT__0" data_type: TYPE_BF16 dims: [ 3 ] } ]
        """,
    )
    _save_script(Twice(), model_dir / "1" / "twice.pt")
    model = load(model_dir)
    x = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    out = run_one(model, {"INPUT__0": x})["OUTPUT__0"]
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(np.float32) * 2)


# ------------------------------------------------------------------------------------------
# PyTorch eager
# ------------------------------------------------------------------------------------------

TINY_NET = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.act = nn.ReLU()
        self.blocks = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
        self.head = nn.Linear(width, classes)
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, x, bias=None):
        h = self.blocks(self.act(self.embed(x)))
        logits = self.head(h) / self.temperature
        if bias is not None:
            logits = logits + bias
        return logits, h.sum(-1)
"""

TINY_CONFIG = """
name: "tiny"
backend: "pytorch"
max_batch_size: 4
input [
  { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "bias" data_type: TYPE_FP32 dims: [ 5 ] optional: true }
]
output [
  { name: "logits" data_type: TYPE_FP32 dims: [ 5 ] },
  { name: "energy" data_type: TYPE_FP32 dims: [ 1 ] }
]
parameters { key: "torpor.module_class" value: { string_value: "model.py:Tiny" } }
parameters { key: "torpor.module_kwargs" value: { string_value: "{\\"classes\\": 5}" } }
parameters { key: "torpor.generate_weights" value: { string_value: "7" } }
"""


def test_eager_generated_weights_and_layer_groups(tmp_path):
    model_dir = make_model(tmp_path, "tiny", TINY_CONFIG, {"model.py": TINY_NET})
    rng_before = torch.get_rng_state()
    model = load(model_dir)
    assert torch.equal(torch.get_rng_state(), rng_before)  # generation used its own RNG
    assert type(model).__name__ == "EagerModelFunction"
    weights = model_dir / "1" / "model.safetensors"
    assert weights.is_file()

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    first = run_one(model, {"x": x}, ["logits", "energy"])
    assert first["logits"].shape == (3, 5) and first["energy"].shape == (3,)
    biased = run_one(model, {"x": x, "bias": np.ones((3, 5), np.float32)}, ["logits"])
    np.testing.assert_allclose(biased["logits"], first["logits"] + 1, rtol=1e-6)

    state = model.module.state_dict()
    groups = model.layer_groups()
    assert [g.name for g in groups] == ["_root", "embed", "blocks", "head"]
    keys = [k for g in groups for k in g.tensors]
    assert keys == list(state)  # every key, once, in state_dict order
    assert sum(g.nbytes for g in groups) == sum(t.numel() * t.element_size() for t in state.values())
    for g in groups:
        for k, t in g.tensors.items():
            assert t.data_ptr() == state[k].data_ptr()  # the module's own tensors, no copies
    assert model.weight_bytes == sum(g.nbytes for g in groups)

    # weights given explicitly (as the swap engine will) replace the module's for one call
    doubled = {k: t * 2 if k.startswith("head.") else t for k, t in state.items()}
    out = model.forward_tensors({"x": torch.from_numpy(x)}, weights=doubled)
    plain = model.forward_tensors({"x": torch.from_numpy(x)})
    assert not torch.allclose(out["logits"], plain["logits"])
    np.testing.assert_allclose(plain["logits"].numpy(), first["logits"], rtol=1e-6)
    model.unload()

    # a fresh load reads the saved file and gives the same answers
    mtime = weights.stat().st_mtime_ns
    again = load(model_dir)
    assert weights.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(run_one(again, {"x": x}, ["logits"])["logits"], first["logits"])
    assert not any(t.is_meta for t in again.module.state_dict().values())
    again.unload()


def test_eager_dict_outputs_and_importable_class(tmp_path):
    model_dir = make_model(
        tmp_path,
        "mlp",
        """
        name: "mlp"
        backend: "pytorch"
        max_batch_size: 8
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 16 ] } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ 16 ] } ]
        parameters { key: "torpor.module_class" value: { string_value: "torpor.adapters.networks:WideMLP" } }
        parameters {
          key: "torpor.module_kwargs"
          value: { string_value: "{\\"hidden\\": 16, \\"layers\\": 3}" }
        }
        parameters { key: "torpor.generate_weights" value: { string_value: "3" } }
        """,
    )
    model = load(model_dir)
    assert [g.name for g in model.layer_groups()] == ["fc0", "fc1", "fc2"]
    assert model.weight_bytes == 3 * (16 * 16 + 16) * 4
    x = np.ones((2, 16), np.float32)
    r1, r2 = model.execute([ModelRequest({"input": x}, []), ModelRequest({"input": x[:1] * 2}, [])])
    assert r1["output"].shape == (2, 16) and r2["output"].shape == (1, 16)
    solo = run_one(model, {"input": x[:1] * 2})
    np.testing.assert_allclose(r2["output"], solo["output"], rtol=1e-5, atol=1e-6)
    model.unload()

    dict_dir = make_model(
        tmp_path,
        "dict_out",
        """
        name: "dict_out"
        backend: "pytorch"
        input [ { name: "a" data_type: TYPE_FP64 dims: [ 2 ] } ]
        output [ { name: "twice" data_type: TYPE_FP32 dims: [ 2 ] } ]
        parameters { key: "torpor.module_class" value: { string_value: "net.py:Twice" } }
        parameters { key: "torpor.generate_weights" value: { string_value: "0" } }
        """,
        {
            "1/net.py": """
            import torch

            class Twice(torch.nn.Module):
                def forward(self, a):
                    return {"twice": a * 2, "ignored": a}
            """
        },
    )
    model = load(dict_dir)
    out = run_one(model, {"a": np.array([1.0, 2.0])})
    assert out["twice"].dtype == np.float32  # cast to the config's datatype
    np.testing.assert_array_equal(out["twice"], [2.0, 4.0])
    assert model.layer_groups() == []
    model.unload()


def test_eager_missing_weights_without_seed(tmp_path):
    model_dir = make_model(
        tmp_path,
        "noweights",
        """
        name: "noweights"
        backend: "pytorch"
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ 4 ] } ]
        parameters { key: "torpor.module_class" value: { string_value: "torpor.adapters.networks:WideMLP" } }
        """,
    )
    with pytest.raises(FileNotFoundError, match=r"torpor\.generate_weights"):
        load(model_dir)
    bad_class = make_model(
        tmp_path,
        "badclass",
        """
        name: "badclass"
        backend: "pytorch"
        parameters { key: "torpor.module_class" value: { string_value: "torpor.adapters.networks:Nope" } }
        parameters { key: "torpor.generate_weights" value: { string_value: "0" } }
        """,
    )
    with pytest.raises(ValueError, match="no attribute 'Nope'"):
        load(bad_class)


# ------------------------------------------------------------------------------------------
# the example networks
# ------------------------------------------------------------------------------------------


def _fresh_copy(tmp_path: Path, name: str, tag: str) -> Path:
    target = tmp_path / tag / name
    (target / "1").mkdir(parents=True)
    shutil.copy(EXAMPLES / name / "config.pbtxt", target / "config.pbtxt")
    return target


def _check_groups(model):
    state = model.module.state_dict()
    groups = model.layer_groups()
    assert sorted(k for g in groups for k in g.tensors) == sorted(state)
    assert sum(g.nbytes for g in groups) == sum(t.numel() * t.element_size() for t in state.values())
    return groups


def test_resnet50_shapes_groups_and_determinism(tmp_path):
    a = load(_fresh_copy(tmp_path, "resnet50", "a"))
    assert sum(p.numel() for p in a.module.parameters()) == 25_557_032
    groups = _check_groups(a)
    assert [g.name for g in groups] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    out_a = run_one(a, {"input": x}, ["logits"])["logits"]
    assert out_a.shape == (2, 1000) and out_a.dtype == np.float32
    assert np.isfinite(out_a).all() and not np.allclose(out_a[0], out_a[1])
    a.unload()
    b = load(_fresh_copy(tmp_path, "resnet50", "b"))  # generated again from the same seed
    np.testing.assert_array_equal(run_one(b, {"input": x})["logits"], out_a)
    b.unload()


def test_bert_shapes_groups_and_determinism(tmp_path):
    a = load(_fresh_copy(tmp_path, "bert", "a"))
    assert sum(p.numel() for p in a.module.parameters()) == 109_482_240
    groups = _check_groups(a)
    assert [g.name for g in groups] == ["embeddings"] + [f"layer{i}" for i in range(12)] + ["pooler"]
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 30522, size=(2, 12), dtype=np.int64)
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, 8:] = 0
    out_a = run_one(a, {"input_ids": ids, "attention_mask": mask}, ["last_hidden_state", "pooler_output"])
    assert out_a["last_hidden_state"].shape == (2, 12, 768)
    assert out_a["pooler_output"].shape == (2, 768)
    assert np.isfinite(out_a["last_hidden_state"]).all()
    # padding does not change the unpadded tokens' results
    short = run_one(a, {"input_ids": ids[1:, :8], "attention_mask": mask[1:, :8]})
    np.testing.assert_allclose(short["last_hidden_state"][0], out_a["last_hidden_state"][1, :8], atol=1e-4)
    a.unload()
    b = load(_fresh_copy(tmp_path, "bert", "b"))
    out_b = run_one(b, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_array_equal(out_b["last_hidden_state"], out_a["last_hidden_state"])
    np.testing.assert_array_equal(out_b["pooler_output"], out_a["pooler_output"])
    b.unload()
