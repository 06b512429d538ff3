"""gRPC (KServe v2 / Triton) protobuf messages <-> the engine's request and response types.

Inputs come from `raw_input_contents` (taken in order, skipping inputs that live in shared
memory or carry typed `contents`) or from typed `contents`; the two may not be mixed. Outputs
always go to `raw_output_contents`, one entry per `outputs` entry (empty for shm outputs),
because tritonclient's `as_numpy` reads nothing else.
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from torpor.datatypes import NUMPY_DTYPES, check_shape, from_raw, num_elements, to_raw
from torpor.errors import invalid_arg
from torpor.tensors import InferRequest, InferResponse, RequestedOutput, Tensor

EMPTY_FINAL_PARAM = "triton_enable_empty_final_response"
FINAL_PARAM = "triton_final_response"

# typed `contents` field per datatype (FP16 and BF16 travel raw only)
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        return None
    return getattr(p, which)


def params_to_dict(params) -> dict[str, Any]:
    return {k: param_value(v) for k, v in params.items()}


def set_param(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        if v > 2**63 - 1:
            target.uint64_param = v
        else:
            target.int64_param = v
    elif isinstance(value, (float, np.floating)):
        target.double_param = float(value)
    else:
        target.string_param = value if isinstance(value, str) else str(value)


def check_version(version: str) -> str:
    """Triton parses a requested version as an integer; anything else is the client's mistake."""
    if version and not (version.removeprefix("-")).isdigit():
        raise invalid_arg(f"failed to get model version from specified version string '{version}'")
    return version


# Element counts up to this need no overflow checks (check_shape's bound is far above)
_FAST_COUNT = 1 << 40


def _shape(dims, name: str) -> tuple[int, ...]:
    shape = tuple(dims)  # protobuf int64s are Python ints already
    if shape and min(shape) < 0:
        raise invalid_arg(
            f"invalid shape [{','.join(str(d) for d in shape)}] for input '{name}': dimensions must not be negative"
        )
    check_shape(shape, name)
    return shape


def _typed_contents(t: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], model: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(t.datatype)
    if field is None:
        raise invalid_arg(
            f"unable to parse 'contents' for input '{t.name}' for model '{model}': "
            f"datatype {t.datatype} must be sent in raw_input_contents"
        )
    values = getattr(t.contents, field)
    count = num_elements(shape)
    if len(values) != count:
        raise invalid_arg(
            f"unexpected number of elements {len(values)} in '{field}' for input '{t.name}' for model "
            f"'{model}', expecting {count}"
        )
    if t.datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = list(values) if count else []
        return arr.reshape(shape)
    try:
        return np.array(values, dtype=NUMPY_DTYPES[t.datatype]).reshape(shape)
    except (OverflowError, ValueError) as e:
        raise invalid_arg(f"unable to parse 'contents' for input '{t.name}' for model '{model}': {e}") from None


def decode_request(msg: pb.ModelInferRequest) -> tuple[InferRequest, bool]:
    """The engine request and whether empty final responses were asked for (streams)."""
    model = msg.model_name
    if msg.model_version:
        check_version(msg.model_version)
    raw = msg.raw_input_contents
    raw_index = 0
    inputs: list[Tensor] = []
    for t in msg.inputs:
        name = t.name
        datatype = t.datatype
        dt = NUMPY_DTYPES.get(datatype)
        if dt is None:
            raise invalid_arg(f"invalid datatype '{datatype}' for input '{name}' for model '{model}'")
        shape = tuple(t.shape)  # protobuf int64s are Python ints already
        count = prod(shape)
        if not 0 < count <= _FAST_COUNT or min(shape, default=0) < 0:  # the careful checks
            shape = _shape(shape, name)
            count = num_elements(shape)
        tparams = t.parameters
        tparams = params_to_dict(tparams) if tparams else {}
        if tparams and "shared_memory_region" in tparams:
            if "shared_memory_byte_size" not in tparams:
                raise invalid_arg(
                    f"input '{name}' for model '{model}' in shared memory must give 'shared_memory_byte_size'"
                )
            if t.HasField("contents"):
                raise invalid_arg(
                    f"contents field must not be specified when using shared memory for '{name}' for model '{model}'"
                )
            inputs.append(Tensor(name, datatype, shape, None, tparams))
            continue
        if t.HasField("contents"):
            if raw:
                raise invalid_arg(
                    f"contents field must not be specified when using raw_input_contents for '{name}' "
                    f"for model '{model}'"
                )
            inputs.append(Tensor(name, datatype, shape, _typed_contents(t, shape, model), tparams))
            continue
        if raw_index >= len(raw):
            raise invalid_arg(
                f"expected raw_input_contents for input '{name}' for model '{model}', but the request carries "
                f"only {len(raw)} raw input(s)"
            )
        buf = raw[raw_index]
        raw_index += 1
        if datatype == "BYTES":
            arr = from_raw(buf, datatype, shape, name)
        else:
            if len(buf) != count * dt.itemsize:
                from_raw(buf, datatype, shape, name)  # raises the size error
            arr = np.frombuffer(buf, dtype=dt, count=count).reshape(shape)
        inputs.append(Tensor(name, datatype, shape, arr, tparams))
    if raw_index != len(raw):
        raise invalid_arg(
            f"unexpected number of raw_input_contents for model '{model}': {len(raw)} given, "
            f"{raw_index} input(s) take raw contents"
        )

    params: dict[str, Any] = {}
    empty_final = False
    for k, v in (msg.parameters.items() if msg.parameters else ()):
        if k == EMPTY_FINAL_PARAM:
            empty_final = bool(param_value(v))
            continue
        if k in _TYPED_PARAMS:
            _check_typed(k, v)
        params[k] = param_value(v)  # the engine refuses the other reserved triton_* keys

    outputs = None
    if msg.outputs:
        outputs = []
        for o in msg.outputs:
            oparams = params_to_dict(o.parameters) if o.parameters else {}
            if "classification" in oparams:
                _check_classification(o.parameters["classification"])
            outputs.append(RequestedOutput(o.name, oparams))
    req = InferRequest(
        model_name=model,
        model_version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=outputs,
        parameters=params,
    )
    return req, empty_final


def _check_typed(key: str, p: pb.InferParameter) -> None:
    """Triton's gRPC front end takes `timeout` as an int64 only (a negative one, as it reads it
    unsigned, means none) and `priority` as a non-negative int64 or a uint64."""
    which = p.WhichOneof("parameter_choice")
    if key == "timeout":
        if which != "int64_param":
            raise invalid_arg("invalid value type for 'timeout' parameter, expected int64_param.")
    elif which == "int64_param":
        if p.int64_param < 0:
            raise invalid_arg("invalid value for 'priority', expected value >= 0.")
    elif which != "uint64_param":
        raise invalid_arg("invalid value type for 'priority' parameter, expected int64_param or uint64_param.")


def _check_classification(p: pb.InferParameter) -> None:
    if p.WhichOneof("parameter_choice") != "int64_param":
        raise invalid_arg("invalid value type for 'classification' parameter, expected int64_param")
    if p.int64_param <= 0:  # Triton's text, though it refuses 0 too
        raise invalid_arg("invalid value for 'classification' parameter, expected >= 0")


_TYPED_PARAMS = frozenset(("timeout", "priority"))


def encode_response(resp: InferResponse, out: pb.ModelInferResponse | None = None) -> pb.ModelInferResponse:
    msg = out if out is not None else pb.ModelInferResponse()
    msg.model_name = resp.model_name
    msg.model_version = resp.model_version
    if resp.id:
        msg.id = resp.id
    if resp.parameters:
        for k, v in resp.parameters.items():
            set_param(msg.parameters[k], v)
    raw_out = []
    for t in resp.outputs:
        o = msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if t.data is None:  # written to a shared-memory region
            for k in _SHM_KEYS:
                if k in t.parameters:
                    set_param(o.parameters[k], t.parameters[k])
            raw_out.append(b"")
        else:
            raw_out.append(to_raw(t.data, t.datatype))
    msg.raw_output_contents.extend(raw_out)
    return msg
