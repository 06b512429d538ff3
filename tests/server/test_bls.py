"""Business Logic Scripting: python models calling other models with
`pb_utils.InferenceRequest(...).exec()` / `async_exec()`, through a real server. (In process, on the
engine itself: tests/unit/test_bls_engine.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ..bls_models import bls_repo
from ..conftest import Server


@pytest.fixture(scope="module")
def bls_server(tmp_path_factory):
    s = Server(bls_repo(tmp_path_factory.mktemp("blsrepo"))).start(tmp_path_factory.mktemp("blslogs"))
    yield s
    s.stop()


@pytest.fixture
def client(bls_server):
    with httpclient.InferenceServerClient(bls_server.http_url) as c:
        yield c


def simple_inputs(a: np.ndarray, b: np.ndarray) -> list:
    inputs = []
    for name, x in (("INPUT0", a), ("INPUT1", b)):
        inputs.append(httpclient.InferInput(name, x.shape, "INT32"))
        inputs[-1].set_data_from_numpy(x)
    return inputs


def test_bls_calls_simple_and_returns_its_result(client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    # Past InlineGate.PROBE: a BLS caller must keep running on a worker thread (never inline).
    for i in range(100):
        b = np.full((1, 16), i, np.int32)
        r = client.infer("bls_add", simple_inputs(a, b))
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    stats = client.get_inference_statistics("simple")["model_stats"][0]
    assert int(stats["inference_count"]) >= 100  # the callee ran (and is counted) for each call


def test_bls_batch_and_version(client):
    a = np.arange(48, dtype=np.int32).reshape(3, 16)
    b = np.ones((3, 16), np.int32)
    r = client.infer("bls_add", simple_inputs(a, b), parameters={"version": 1})
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    with pytest.raises(InferenceServerException) as e:
        client.infer("bls_add", simple_inputs(a, b), parameters={"version": 7, "mode": "return"})
    assert "simple" in str(e.value) and "7" in str(e.value)


def test_bls_callee_error_surfaces_as_the_callers_error(client):
    a = np.zeros((1, 16), np.int32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("bls_add", simple_inputs(a, a), parameters={"target": "failing_callee"})
    assert "callee exploded" in str(e.value)
    # Returned as the caller's response error: message and status come through unchanged.
    with pytest.raises(InferenceServerException) as e:
        params = {"target": "failing_callee", "mode": "return"}
        client.infer("bls_add", simple_inputs(a, a), parameters=params)
    assert "callee exploded" in str(e.value) and "ValueError" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.infer("bls_add", simple_inputs(a, a), parameters={"target": "no_such_model", "mode": "return"})
    assert "no_such_model" in str(e.value) and e.value.status() == "404"
    stats = client.get_inference_statistics("bls_add")["model_stats"][0]["inference_stats"]
    assert int(stats["fail"]["count"]) >= 1


def test_bls_async_exec(client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, np.int32)
    for _ in range(40):
        r = client.infer("bls_async", simple_inputs(a, b))
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), b - a)


@pytest.mark.parametrize("model", ["bls_stream", "bls_stream_async"])
def test_bls_decoupled_stream(client, model):
    values = np.array([3, 4, 5], np.int32)
    inp = httpclient.InferInput("IN", values.shape, "INT32")
    inp.set_data_from_numpy(values)
    r = client.infer(model, [inp])
    # three responses with OUT, then repeat_int32's bare final flag as an empty response
    assert (int(r.as_numpy("SUM")[0]), int(r.as_numpy("COUNT")[0]), int(r.as_numpy("EMPTY")[0])) == (12, 4, 1)


def test_bls_non_decoupled_exec_on_a_decoupled_model(client):
    a = np.zeros((1, 16), np.int32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("bls_add", simple_inputs(a, a), parameters={"target": "repeat_int32", "mode": "return"})
    assert "decoupled=True" in str(e.value)
