"""Business Logic Scripting: python models calling other models with
`pb_utils.InferenceRequest(...).exec()` / `async_exec()`, through a real server and in process."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import make_repo

SIMPLE_IO = """
    max_batch_size: 8
    input [
      { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
      { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
    ]
    output [
      { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
      { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
    ]
"""

# Calls the model named by the request parameter "target" (default: simple) with its own inputs.
# mode "raise": a callee error is raised (Triton's usual pattern); "return": returned as is.
BLS_ADD = """
import json
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            params = json.loads(request.parameters())
            bls = pb_utils.InferenceRequest(
                model_name=params.get("target", "simple"),
                requested_output_names=["OUTPUT0", "OUTPUT1"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                        pb_utils.get_input_tensor_by_name(request, "INPUT1")],
                model_version=int(params.get("version", -1)),
            )
            result = bls.exec()
            if result.has_error():
                if params.get("mode", "raise") == "raise":
                    raise pb_utils.TritonModelException(result.error().message())
                responses.append(pb_utils.InferenceResponse(error=result.error()))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.get_output_tensor_by_name(result, "OUTPUT0"),
                pb_utils.get_output_tensor_by_name(result, "OUTPUT1"),
            ]))
        return responses
"""

FAILING_CALLEE = """
class TritonPythonModel:
    def execute(self, requests):
        raise ValueError("callee exploded")
"""

# Two concurrent async_exec calls to simple: OUTPUT0 = a + b (first), OUTPUT1 = b - a (second).
BLS_ASYNC = """
import asyncio
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            calls = [
                pb_utils.InferenceRequest(
                    model_name="simple", requested_output_names=["OUTPUT0", "OUTPUT1"],
                    inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", y)],
                ).async_exec()
                for x, y in ((a, b), (b, a))
            ]
            first, second = await asyncio.gather(*calls)
            for r in (first, second):
                if r.has_error():
                    raise pb_utils.TritonModelException(r.error().message())
            responses.append(pb_utils.InferenceResponse([
                pb_utils.get_output_tensor_by_name(first, "OUTPUT0"),
                pb_utils.get_output_tensor_by_name(second, "OUTPUT1"),
            ]))
        return responses
"""

STREAM_IO = """
    max_batch_size: 0
    input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]
    output [
      { name: "SUM" data_type: TYPE_INT32 dims: [ 1 ] },
      { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] },
      { name: "EMPTY" data_type: TYPE_INT32 dims: [ 1 ] }
    ]
"""

# Streams repeat_int32 (one response per element of IN, then a bare final flag) and sums OUT.
STREAM_BODY = """
import numpy as np
import triton_python_backend_utils as pb_utils


def bls_request(request):
    values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
    return pb_utils.InferenceRequest(
        model_name="repeat_int32", requested_output_names=["OUT", "IDX"],
        inputs=[pb_utils.Tensor("IN", values),
                pb_utils.Tensor("DELAY", np.zeros(values.shape, np.uint32)),
                pb_utils.Tensor("WAIT", np.zeros([1], np.uint32))],
    )


def summary(responses):
    total = count = empty = 0
    for r in responses:
        if r.has_error():
            raise pb_utils.TritonModelException(r.error().message())
        count += 1
        out = pb_utils.get_output_tensor_by_name(r, "OUT")
        if out is None:
            empty += 1
        else:
            total += int(out.as_numpy()[0])
    return pb_utils.InferenceResponse([
        pb_utils.Tensor(name, np.array([v], np.int32))
        for name, v in (("SUM", total), ("COUNT", count), ("EMPTY", empty))
    ])
"""

BLS_STREAM = STREAM_BODY + """

class TritonPythonModel:
    def execute(self, requests):
        return [summary(bls_request(r).exec(decoupled=True)) for r in requests]
"""

BLS_STREAM_ASYNC = STREAM_BODY + """

class TritonPythonModel:
    async def execute(self, requests):
        return [summary(await bls_request(r).async_exec(decoupled=True)) for r in requests]
"""


def write_model(repo: Path, name: str, io: str, code: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    config = f'name: "{name}"\nbackend: "python"\n' + textwrap.dedent(io)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(code)


def bls_repo(dest: Path) -> Path:
    make_repo(dest, ["simple", "repeat_int32"])
    write_model(dest, "bls_add", SIMPLE_IO, BLS_ADD)
    write_model(dest, "failing_callee", SIMPLE_IO, FAILING_CALLEE)
    write_model(dest, "bls_async", SIMPLE_IO, BLS_ASYNC)
    write_model(dest, "bls_stream", STREAM_IO, BLS_STREAM)
    write_model(dest, "bls_stream_async", STREAM_IO, BLS_STREAM_ASYNC)
    return dest


@pytest.fixture(scope="module")
def bls_server(tmp_path_factory):
    from .conftest import Server

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


# in process -----------------------------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path):
    import asyncio

    from torpor.adapters import create_model_function
    from torpor.adapters.bls import install_bls, uninstall_bls

    from torpor.dataplane.engine import Engine, EngineOptions

    options = EngineOptions(model_repositories=[str(bls_repo(tmp_path / "repo"))])
    eng = Engine(options, create_model_function)
    install_bls(eng, asyncio.get_running_loop())
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()
        uninstall_bls()


def _request(model: str, a: np.ndarray, b: np.ndarray, **parameters):
    from torpor.tensors import InferRequest, Tensor

    return InferRequest(
        model, inputs=[Tensor("INPUT0", "INT32", a.shape, a), Tensor("INPUT1", "INT32", b.shape, b)],
        parameters=parameters,
    )


async def test_bls_caller_never_runs_inline_but_callee_may(engine):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    for i in range(80):
        b = np.full((1, 16), i, np.int32)
        response = await engine.infer(_request("bls_add", a, b))
        np.testing.assert_array_equal(response.outputs[0].data, a + b)
        response = await engine.infer(_request("bls_async", a, b))
        np.testing.assert_array_equal(response.outputs[1].data, b - a)
    for caller in ("bls_add", "bls_async"):
        assert engine.models[caller].versions[1].function.blocking
    assert engine.models["simple"].versions[1].gate.inline  # cheap callee: promoted as usual


async def test_bls_exec_on_the_event_loop_thread_fails_clearly(engine):
    from torpor.adapters import triton_python_backend_utils as pb_utils

    a = np.zeros((1, 16), np.int32)
    request = pb_utils.InferenceRequest(
        model_name="simple", requested_output_names=["OUTPUT0"],
        inputs=[pb_utils.Tensor("INPUT0", a), pb_utils.Tensor("INPUT1", a)],
    )
    with pytest.raises(pb_utils.TritonModelException, match="event loop thread"):
        request.exec()
    with pytest.raises(pb_utils.TritonModelException, match="event loop thread"):
        request.exec(decoupled=True)
    # async_exec on the loop itself just awaits the engine
    response = await request.async_exec()
    assert not response.has_error() and json.loads(response.parameters()) == {}
    np.testing.assert_array_equal(pb_utils.get_output_tensor_by_name(response, "OUTPUT0").as_numpy(), a)


async def test_bls_exec_from_a_model_running_inline(engine):
    """A model that starts calling BLS only after it was promoted to the loop: that request fails
    with the clear error, the model is taken off the loop, the next request works."""
    ve = engine.models["bls_add"].versions[1]
    ve.gate.inline = True  # as if it had been cheap so far
    a = np.ones((1, 16), np.int32)
    from torpor.errors import TorporError

    with pytest.raises(TorporError, match="event loop thread"):
        await engine.infer(_request("bls_add", a, a))
    assert ve.function.blocking  # runs on a worker thread from its next request on
    response = await engine.infer(_request("bls_add", a, a))
    np.testing.assert_array_equal(response.outputs[0].data, a + a)


async def test_bls_stream_timeout_and_cancel(engine):
    import asyncio

    from torpor.adapters import triton_python_backend_utils as pb_utils

    def stream_request(timeout_us: int = 0):
        # repeat_int32: OUT=1 at once, OUT=2 after 1.5 s, then the final flag
        return pb_utils.InferenceRequest(
            model_name="repeat_int32", requested_output_names=["OUT"], timeout=timeout_us,
            inputs=[pb_utils.Tensor("IN", np.array([1, 2], np.int32)),
                    pb_utils.Tensor("DELAY", np.array([0, 1500], np.uint32)),
                    pb_utils.Tensor("WAIT", np.zeros([1], np.uint32))],
        )

    def timed_out():
        return list(stream_request(300_000).exec(decoupled=True))

    def cancelled():
        responses = stream_request().exec(decoupled=True)
        first = next(responses)
        responses.cancel()
        return first, list(responses)

    loop = asyncio.get_running_loop()
    first, expired = await loop.run_in_executor(None, timed_out)
    assert int(pb_utils.get_output_tensor_by_name(first, "OUT").as_numpy()[0]) == 1
    assert expired.has_error() and expired.error().code() == pb_utils.TritonError.UNAVAILABLE
    assert "timeout" in expired.error().message()
    first, rest = await loop.run_in_executor(None, cancelled)
    assert int(pb_utils.get_output_tensor_by_name(first, "OUT").as_numpy()[0]) == 1
    assert [r.error().code() for r in rest] == [pb_utils.TritonError.CANCELLED]
