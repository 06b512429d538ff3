"""The data plane in process: `torpor.dataplane.engine.Engine` over a small repository of Triton's
example models, started on the test's own event loop with the adapters the server wires
(`torpor.adapters.create_model_function`), with no server and no front end in between. Only the
engine's public methods are used: what the HTTP and gRPC front ends call.

(The same behaviour through real servers and tritonclient: tests/server/test_http.py, test_grpc.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from torpor.adapters import create_model_function

from torpor.dataplane.engine import Engine, EngineOptions
from torpor.errors import Status, TorporError
from torpor.tensors import InferRequest, RequestedOutput, Tensor

from ..conftest import make_repo


@pytest.fixture
async def start_engine(tmp_path):
    """Start engines over copies of the named example models; stopped at the end of the test."""
    started: list[Engine] = []

    async def _start(models: list[str], **options) -> Engine:
        repo = make_repo(tmp_path / f"repo{len(started)}", models)
        engine = Engine(EngineOptions(model_repositories=[str(repo)], **options), create_model_function)
        await engine.start()
        started.append(engine)
        return engine

    yield _start
    for engine in started:
        await engine.stop()


def simple_request(a: np.ndarray, b: np.ndarray, model: str = "simple", **kw) -> InferRequest:
    inputs = [Tensor("INPUT0", "INT32", list(a.shape), a), Tensor("INPUT1", "INT32", list(b.shape), b)]
    return InferRequest(model, inputs=inputs, **kw)


def outputs(response) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data).reshape(t.shape) for t in response.outputs}


A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


async def test_infer_simple(start_engine):
    engine = await start_engine(["simple"])
    assert engine.is_ready() and engine.model_ready("simple")
    response = await engine.infer(simple_request(A, B, id="r1"))
    assert (response.model_name, response.model_version, response.id) == ("simple", "1", "r1")
    out = outputs(response)
    np.testing.assert_array_equal(out["OUTPUT0"], A + B)
    np.testing.assert_array_equal(out["OUTPUT1"], A - B)
    # a batch of two, one requested output, an explicit version
    a2, b2 = np.vstack([A, A * 2]), np.vstack([B, B])
    response = await engine.infer(simple_request(a2, b2, model_version="1", outputs=[RequestedOutput("OUTPUT1")]))
    out = outputs(response)
    assert list(out) == ["OUTPUT1"]
    np.testing.assert_array_equal(out["OUTPUT1"], a2 - b2)


def _without(name: str) -> list[Tensor]:
    return [t for t in simple_request(A, B).inputs if t.name != name]


BAD_INPUTS = {
    "wrong datatype": ([Tensor("INPUT0", "FP32", [1, 16], A.astype(np.float32)), *_without("INPUT0")], None,
                       "data-type"),
    "wrong shape": ([Tensor("INPUT0", "INT32", [1, 15], A[:, :15]), *_without("INPUT0")], None, "shape"),
    "missing input": (_without("INPUT1"), None, "missing required input"),
    "extra input": ([*simple_request(A, B).inputs, Tensor("INPUT9", "INT32", [1, 16], A)], None,
                    "unexpected inference input"),
    "unknown output": (simple_request(A, B).inputs, [RequestedOutput("NOPE")], "unexpected inference output"),
    "batch too large": (simple_request(np.zeros((9, 16), np.int32), np.zeros((9, 16), np.int32)).inputs, None,
                        "batch-size"),
}


async def test_bad_inputs_are_invalid_argument(start_engine):
    """Each malformed request fails with INVALID_ARG and Triton's message, is counted as a failure,
    and the model keeps answering."""
    engine = await start_engine(["simple"])
    for case, (inputs, requested, fragment) in BAD_INPUTS.items():
        with pytest.raises(TorporError) as e:
            await engine.infer(InferRequest("simple", inputs=inputs, outputs=requested))
        assert e.value.status is Status.INVALID_ARG, (case, e.value)
        assert fragment.lower() in e.value.message.lower(), (case, e.value.message)
    (stats,) = engine.statistics("simple")
    assert stats["inference_stats"]["fail"]["count"] == len(BAD_INPUTS)
    assert stats["inference_stats"]["success"]["count"] == 0
    np.testing.assert_array_equal(outputs(await engine.infer(simple_request(A, B)))["OUTPUT0"], A + B)


async def test_unknown_model_and_version_are_not_found(start_engine):
    engine = await start_engine(["simple"])
    for name, version in (("nope", ""), ("simple", "3")):
        with pytest.raises(TorporError) as e:
            await engine.infer(simple_request(A, B, model=name, model_version=version))
        assert e.value.status is Status.NOT_FOUND
        assert e.value.message.startswith("Request for unknown model"), e.value.message
        assert not engine.model_ready(name, version)
    with pytest.raises(TorporError) as e:
        engine.statistics("nope")
    assert e.value.status is Status.NOT_FOUND
    with pytest.raises(TorporError) as e:
        engine.model_metadata("nope")
    assert e.value.status is Status.NOT_FOUND


async def test_explicit_mode_load_and_unload(start_engine):
    engine = await start_engine(["simple", "simple_identity"], model_control_mode="explicit",
                                load_models=["simple"])
    index = {m["name"]: m for m in engine.repository_index()}
    assert index["simple"]["state"] == "READY"
    assert index["simple_identity"] == {"name": "simple_identity"}  # in the repository, never loaded
    assert not engine.model_ready("simple_identity")

    await engine.load("simple_identity")
    assert engine.model_ready("simple_identity")
    words = np.array([[b"late", b"binding"]], dtype=np.object_)
    response = await engine.infer(InferRequest("simple_identity", inputs=[Tensor("INPUT0", "BYTES", [1, 2], words)]))
    assert [bytes(x) for x in np.asarray(outputs(response)["OUTPUT0"]).reshape(-1)] == [b"late", b"binding"]

    await engine.unload("simple_identity")
    assert not engine.model_ready("simple_identity")
    index = {m["name"]: m for m in engine.repository_index()}
    assert index["simple_identity"]["state"] == "UNAVAILABLE" and index["simple_identity"]["reason"] == "unloaded"
    with pytest.raises(TorporError) as e:
        await engine.infer(InferRequest("simple_identity", inputs=[Tensor("INPUT0", "BYTES", [1, 2], words)]))
    assert "simple_identity" in e.value.message
    assert engine.model_ready("simple")  # the other model was never touched

    with pytest.raises(TorporError) as e:
        await engine.load("no_such_model")
    assert e.value.message.startswith("failed to load 'no_such_model'"), e.value.message


async def test_load_refused_without_explicit_mode(start_engine):
    engine = await start_engine(["simple"])
    with pytest.raises(TorporError) as e:
        await engine.load("simple")
    assert e.value.status is Status.UNAVAILABLE and "polling is enabled" in e.value.message


async def test_statistics_count_the_requests(start_engine):
    engine = await start_engine(["simple", "simple_identity"])
    a2, b2 = np.vstack([A, A]), np.vstack([B, B])
    for _ in range(3):
        await engine.infer(simple_request(a2, b2))
    with pytest.raises(TorporError):
        await engine.infer(simple_request(A, B[:, :8]))
    (stats,) = engine.statistics("simple")
    assert (stats["name"], stats["version"]) == ("simple", "1")
    infer_stats = stats["inference_stats"]
    assert infer_stats["success"]["count"] == 3
    assert infer_stats["fail"]["count"] == 1
    assert stats["inference_count"] == 6  # batch 2, three times
    assert stats["execution_count"] == 3
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(2, 3)]
    assert stats["last_inference"] > 0
    assert infer_stats["success"]["ns"] >= infer_stats["compute_infer"]["ns"] > 0
    # every ready model, and the untouched one at zero
    everything = {s["name"]: s for s in engine.statistics()}
    assert set(everything) == {"simple", "simple_identity"}
    assert everything["simple_identity"]["inference_count"] == 0


async def test_decoupled_model_streams_and_refuses_plain_infer(start_engine):
    engine = await start_engine(["repeat_int32"])
    values = np.array([4, 5, 6], np.int32)
    request = InferRequest("repeat_int32", inputs=[
        Tensor("IN", "INT32", [3], values),
        Tensor("DELAY", "UINT32", [3], np.zeros(3, np.uint32)),
        Tensor("WAIT", "UINT32", [1], np.zeros(1, np.uint32)),
    ])
    responses = [r async for r in engine.infer_stream(request)]
    got = [int(outputs(r)["OUT"].reshape(-1)[0]) for r in responses if r.outputs]
    assert got == [4, 5, 6]
    assert responses[-1].final and not any(r.final for r in responses[:-1])
    with pytest.raises(TorporError) as e:
        await engine.infer(request)
    assert e.value.status is Status.UNSUPPORTED and "decoupled" in e.value.message
