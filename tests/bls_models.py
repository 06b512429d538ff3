"""Business Logic Scripting test models (python models that call other models through
`pb_utils.InferenceRequest`), written into temporary repositories beside Triton's `simple` and
`repeat_int32`. Used by tests/server/test_bls.py and tests/unit/test_bls_engine.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

from . import models
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
    models.write_model(repo, name, f'name: "{name}"\nbackend: "python"\n' + textwrap.dedent(io), code)


def bls_repo(dest: Path) -> Path:
    make_repo(dest, ["simple", "repeat_int32"])
    write_model(dest, "bls_add", SIMPLE_IO, BLS_ADD)
    write_model(dest, "failing_callee", SIMPLE_IO, FAILING_CALLEE)
    write_model(dest, "bls_async", SIMPLE_IO, BLS_ASYNC)
    write_model(dest, "bls_stream", STREAM_IO, BLS_STREAM)
    write_model(dest, "bls_stream_async", STREAM_IO, BLS_STREAM_ASYNC)
    return dest
