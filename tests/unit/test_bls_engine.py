"""Business Logic Scripting in process: the engine itself (no server) running python models that
call other models, where the caller runs (never inline on the loop), and BLS calls made on the
event loop thread. (Through a real server: tests/server/test_bls.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ..bls_models import bls_repo


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
        assert engine.resolve(caller, "1")[1].function.blocking
    assert engine.resolve("simple", "1")[1].gate.inline  # cheap callee: promoted as usual


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
    ve = engine.resolve("bls_add", "1")[1]
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
