"""KServe v2 REST infer bodies <-> engine requests/responses.

JSON tensors and Triton's binary tensor extension: a body is a JSON header, optionally followed
by raw tensor bytes whose JSON length is given by `Inference-Header-Content-Length`. Binary
inputs become zero-copy numpy views of the request body.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from torpor.datatypes import NUMPY_DTYPES, check_shape, element_size, from_raw, num_elements, to_raw
from torpor.errors import invalid_arg
from torpor.tensors import InferRequest, InferResponse, RequestedOutput, Tensor

# Triton's HTTP_MAX_JSON_NESTING_DEPTH: a tensor's `data` may nest arrays this deep, less one
_MAX_JSON_DEPTH = 100
_DEPTH_ERROR = f"JSON nesting depth exceeds maximum allowed limit ({_MAX_JSON_DEPTH})"
# Triton's text for a parameter that must be an unsigned integer and is not
_NOT_UNSIGNED = "attempt to access JSON non-unsigned-integer as unsigned-integer"


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid_arg(f"failed to parse the request JSON buffer: {e}") from None


def _depth_ok(obj: Any, limit: int) -> bool:
    """Whether no array or object sits `limit` or more levels deep. Iterative, so any depth is
    safe to check (orjson itself refuses documents nested over 1024 deep)."""
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if d >= limit:
            return False
        if isinstance(o, list) and o and isinstance(o[0], (list, dict)):
            stack.extend((x, d + 1) for x in o)
        elif isinstance(o, dict):
            stack.extend((x, d + 1) for x in o.values() if isinstance(x, (list, dict)))
    return True


def _data_depth_ok(data: list) -> bool:
    """Triton's bound on a tensor's `data`: its values sit at most 99 arrays deep (it counts
    `data` itself as level 0 and refuses a value at level 100)."""
    stack = [(data, 0)]
    while stack:
        o, d = stack.pop()
        if o and isinstance(o[0], list):
            stack.extend((x, d + 1) for x in o if isinstance(x, list))
        elif o and d + 1 >= _MAX_JSON_DEPTH:
            return False
    return True


def _unsigned(params: dict, key: str, verb: str = "parse") -> None:
    """Triton reads `timeout`, `priority` and `classification` as JSON unsigned integers."""
    v = params.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise invalid_arg(f"Unable to {verb} '{key}': {_NOT_UNSIGNED}")


def _params(obj: Any, where: str) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise invalid_arg(f"'parameters' of {where} must be a JSON object")
    for k, v in obj.items():
        if not isinstance(v, (str, int, float, bool)) and v is not None:
            raise invalid_arg(f"parameter '{k}' of {where} must be a string, number or boolean")
    return obj


def _shape(obj: Any, name: str) -> tuple[int, ...]:
    if not isinstance(obj, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in obj):
        raise invalid_arg(f"'shape' of input '{name}' must be an array of integers")
    if any(d < 0 for d in obj):  # Triton's text (its L0_http test matches it; it answers 500)
        raise invalid_arg(f"Unable to parse 'shape': {_NOT_UNSIGNED} (input '{name}' has a negative dimension)")
    check_shape(obj, name)
    return tuple(obj)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    if datatype in ("FP16", "BF16"):
        raise invalid_arg(f"receiving {datatype} data via JSON is not supported. Please use the binary data format for input '{name}'")
    flat = _flatten(data)
    count = num_elements(shape)
    if len(flat) != count:
        raise invalid_arg(
            f"unexpected number of elements {len(flat)} for input '{name}', expecting {count}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        for i, v in enumerate(flat):
            if isinstance(v, str):
                arr[i] = v.encode("utf-8")
            else:
                raise invalid_arg(f"expected string data for BYTES input '{name}'")
        return arr.reshape(shape)
    dt = NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise invalid_arg(f"expected boolean data for BOOL input '{name}'")
    else:
        kind_int = dt.kind in "iu"
        for v in flat:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind_int and isinstance(v, float)):
                raise invalid_arg(f"unable to parse 'data' of input '{name}': expected {datatype} values")
    try:
        return np.array(flat, dtype=dt).reshape(shape)
    except (OverflowError, ValueError) as e:
        raise invalid_arg(f"unable to parse 'data' of input '{name}': {e}") from None


def decode_infer_request(
    body: bytes, header_length: int | None, model_name: str, model_version: str
) -> InferRequest:
    if header_length is None:
        header_raw: bytes | memoryview = body
        binary = memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise invalid_arg(
                f"inference header size should be in range (0, {len(body)}), got: {header_length}"
            )
        mv = memoryview(body)
        header_raw, binary = mv[:header_length], mv[header_length:]
    header = _loads(header_raw)
    if not isinstance(header, dict):
        raise invalid_arg("inference request JSON must be an object")
    # `data` is the only place requests nest deeply: its own depth is what Triton bounds
    # (`data` two levels below the document); the rest of the document is bounded likewise
    if not _depth_ok(header, _MAX_JSON_DEPTH + 3):
        raise invalid_arg(_DEPTH_ERROR)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise invalid_arg("inference request JSON must contain an 'inputs' array")
    req_id = header.get("id", "")
    if not isinstance(req_id, str):
        raise invalid_arg("'id' must be a string")
    params = _params(header.get("parameters"), "the request")
    if params:
        _unsigned(params, "timeout")
        _unsigned(params, "priority")
    offset = 0
    inputs: list[Tensor] = []
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise invalid_arg(f"input {i} must be a JSON object")
        name = t.get("name")
        if not isinstance(name, str):
            raise invalid_arg(f"input {i} must have a string 'name'")
        datatype = t.get("datatype")
        if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
            raise invalid_arg(f"invalid datatype '{datatype}' for input '{name}'")
        shape = _shape(t.get("shape"), name)
        tparams = _params(t.get("parameters"), f"input '{name}'")
        has_data = "data" in t
        bsize = tparams.get("binary_data_size")
        region = tparams.get("shared_memory_region")
        if sum((has_data, bsize is not None, region is not None)) != 1:
            raise invalid_arg(
                f"input '{name}' must specify exactly one of 'data', 'binary_data_size' or 'shared_memory_region'"
            )
        if bsize is not None:
            if not isinstance(bsize, int) or isinstance(bsize, bool) or bsize < 0:
                raise invalid_arg(f"'binary_data_size' of input '{name}' must be a non-negative integer")
            if offset + bsize > len(binary):
                raise invalid_arg(
                    f"unexpected size for input '{name}', expecting {bsize} bytes but only "
                    f"{len(binary) - offset} bytes remain in the request body"
                )
            chunk = binary[offset : offset + bsize]
            offset += bsize
            if datatype != "BYTES":
                expected = num_elements(shape) * element_size(datatype)
                if bsize != expected:
                    raise invalid_arg(
                        f"unexpected size {bsize} for input '{name}', expecting {expected} bytes for model '{model_name}'"
                    )
            arr = from_raw(chunk, datatype, shape, name)
            inputs.append(Tensor(name, datatype, shape, arr, tparams))
        elif has_data:
            data = t["data"]
            if isinstance(data, list) and not _data_depth_ok(data):
                raise invalid_arg(_DEPTH_ERROR)
            inputs.append(Tensor(name, datatype, shape, _json_tensor(data, datatype, shape, name), tparams))
        else:
            if not isinstance(region, str):
                raise invalid_arg(f"'shared_memory_region' of input '{name}' must be a string")
            if "shared_memory_byte_size" not in tparams:
                raise invalid_arg(f"input '{name}' in shared memory must give 'shared_memory_byte_size'")
            inputs.append(Tensor(name, datatype, shape, None, tparams))
    if offset != len(binary):
        raise invalid_arg(
            f"unexpected additional input data for model '{model_name}': {len(binary) - offset} bytes left over"
        )
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=req_id,
        inputs=inputs,
        outputs=_requested_outputs(header.get("outputs")),
        parameters=params,
    )


def _requested_outputs(raw_outputs: Any) -> list[RequestedOutput] | None:
    """The request's `outputs` (None: every output, as Triton)."""
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise invalid_arg("'outputs' must be an array")
    outputs = []
    for o in raw_outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise invalid_arg("each requested output must be an object with a string 'name'")
        oparams = _params(o.get("parameters"), f"output '{o['name']}'")
        if oparams:
            _unsigned(oparams, "classification", "set")
        outputs.append(RequestedOutput(o["name"], oparams))
    return outputs


def _json_strings(t) -> list[str]:
    """A BYTES output as JSON strings. Bytes that are not UTF-8 cannot be JSON text: refused
    with the fix, rather than altered (Triton sends them as they are, making the document
    invalid JSON that its client refuses with this advice)."""
    try:
        return [v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v) for v in t.data.reshape(-1)]
    except UnicodeDecodeError:
        raise invalid_arg(f"Failed to encode using UTF-8: BYTES output '{t.name}' is not valid UTF-8 text. "
                          "Please use binary_data=True, if you want to pass a byte array.") from None


def encode_infer_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """The body and, when binary outputs follow the JSON, the JSON header's length. Outputs are
    binary where asked for, and by default for a raw binary request (as Triton answers it)."""
    default_binary = request.raw_input is not None or bool(request.parameters.get("binary_data_output", False))
    out_json = []
    blobs: list[bytes] = []
    for t in response.outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        p = t.parameters
        if t.data is None:  # in shared memory
            out_json.append(entry)
            continue
        binary = p.get("binary_data")
        binary = default_binary if binary is None else bool(binary)
        if binary:
            raw = to_raw(t.data, t.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if t.datatype in ("FP16", "BF16"):
                raise invalid_arg(
                    f"sending {t.datatype} data via JSON is not supported. Please use the binary data format for output '{t.name}'"
                )
            if t.datatype == "BYTES":
                entry["data"] = _json_strings(t)
            else:
                entry["data"] = t.data.reshape(-1).tolist()
        out_json.append(entry)
    doc: dict[str, Any] = {}
    if response.id:
        doc["id"] = response.id
    doc["model_name"] = response.model_name
    doc["model_version"] = response.model_version
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = out_json
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
