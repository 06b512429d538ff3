"""Property-based tests of the wire codecs (hypothesis): JSON tensors, the binary tensor
extension, the BYTES encoding and protobuf messages, over random shapes, datatypes and
corruptions. Valid input round-trips exactly; anything else is refused with a TorporError (a
4xx / INVALID_ARGUMENT in the front ends), never another exception."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torpor.api.grpc_codec import decode_request, encode_response
from torpor.api.http_codec import decode_infer_request, encode_infer_response
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from torpor.datatypes import NUMPY_DTYPES, deserialize_bytes, from_raw, serialize_bytes, to_raw
from torpor.errors import TorporError
from torpor.tensors import InferRequest, InferResponse, RequestedOutput, Tensor

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

FIXED = [d for d in NUMPY_DTYPES if d != "BYTES"]
JSON_TYPES = [d for d in FIXED if d not in ("FP16", "BF16")]  # FP16/BF16 travel binary only
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw, datatypes=tuple(NUMPY_DTYPES), finite=False):
    dt = draw(st.sampled_from(datatypes))
    shape = draw(shapes)
    if dt == "BYTES":
        n = int(np.prod(shape, dtype=np.int64))
        items = draw(st.lists(st.binary(max_size=12), min_size=n, max_size=n))
        arr = np.empty(n, dtype=np.object_)
        arr[:] = items if n else []
        return dt, arr.reshape(shape)
    np_dt = NUMPY_DTYPES[dt]
    if dt == "BF16":
        raw = draw(arrays(np.uint16, shape))
        return dt, raw.view(ml_dtypes.bfloat16)
    floats = {"allow_nan": False, "allow_infinity": not finite}  # JSON has no NaN or infinity
    return dt, draw(arrays(np_dt, shape, elements=floats if np_dt.kind == "f" else None))


def _utf8(arr: np.ndarray) -> bool:
    try:
        for v in arr.reshape(-1):
            bytes(v).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype == np.object_:
        return [bytes(x) for x in a.reshape(-1)] == [bytes(x) for x in b.reshape(-1)]
    return a.tobytes() == np.ascontiguousarray(b, dtype=a.dtype).tobytes()


def _refused_or_ok(fn, *args):
    try:
        return fn(*args)
    except TorporError:
        return None


# -- BYTES encoding ---------------------------------------------------------------------------

@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_roundtrip_and_tritonclient_agrees(items):
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    raw = serialize_bytes(arr)
    assert [bytes(x) for x in deserialize_bytes(raw, len(items))] == items
    if items:  # tritonclient's own encoder and decoder read the same bytes
        assert serialize_byte_tensor(arr).item() == raw
        assert list(deserialize_bytes_tensor(raw)) == items


@FUZZ
@given(st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 8)))
def test_bytes_decoder_refuses_garbage_cleanly(raw, count):
    out = _refused_or_ok(deserialize_bytes, raw, count)
    if out is not None:
        assert serialize_bytes(out) == raw


# -- raw tensors --------------------------------------------------------------------------------

@FUZZ
@given(tensors())
def test_raw_roundtrip(t):
    dt, arr = t
    back = from_raw(to_raw(arr, dt), dt, arr.shape)
    assert _same(arr, back)


@FUZZ
@given(st.sampled_from(list(NUMPY_DTYPES)), shapes, st.binary(max_size=80))
def test_raw_decoder_refuses_wrong_sizes(dt, shape, raw):
    out = _refused_or_ok(from_raw, raw, dt, shape)
    if out is not None:
        assert out.shape == shape


# -- HTTP: JSON tensors and the binary extension --------------------------------------------------

def _json_value(dt: str, arr: np.ndarray) -> list:
    if dt == "BYTES":
        return [x.decode("latin-1") for x in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


@FUZZ
@given(st.lists(tensors(JSON_TYPES + ["BYTES"], finite=True), min_size=1, max_size=3), st.booleans())
def test_http_json_tensors_roundtrip(ts, nested):
    inputs = []
    for i, (dt, arr) in enumerate(ts):
        data = _json_value(dt, arr)
        if nested and arr.ndim > 1 and arr.size:
            data = (np.array(data, dtype=object).reshape(arr.shape)).tolist()
        inputs.append({"name": f"IN{i}", "datatype": dt, "shape": list(arr.shape), "data": data})
    req = decode_infer_request(orjson.dumps({"inputs": inputs}), None, "m", "")
    for (dt, arr), t in zip(ts, req.inputs):
        if dt == "BYTES":  # JSON strings carry text: compare the text
            assert [x.decode("utf-8") for x in t.data.reshape(-1)] == [x.decode("latin-1") for x in arr.reshape(-1)]
        else:
            assert _same(arr, t.data)


def _binary_body(ts):
    header = {"inputs": [{"name": f"IN{i}", "datatype": dt, "shape": list(arr.shape),
                          "parameters": {"binary_data_size": len(to_raw(arr, dt))}} for i, (dt, arr) in enumerate(ts)]}
    h = json.dumps(header).encode()
    return h, h + b"".join(to_raw(arr, dt) for dt, arr in ts)


@FUZZ
@given(st.lists(tensors(), min_size=1, max_size=3))
def test_http_binary_roundtrip(ts):
    h, body = _binary_body(ts)
    req = decode_infer_request(body, len(h), "m", "")
    for (dt, arr), t in zip(ts, req.inputs):
        assert t.datatype == dt and _same(arr, t.data)


@FUZZ
@given(st.lists(tensors(), min_size=1, max_size=3), st.data())
def test_http_binary_corruptions_are_refused_cleanly(ts, data):
    h, body = _binary_body(ts)
    how = data.draw(st.sampled_from(["truncate", "extend", "flip", "header_len", "splice"]))
    hlen = len(h)
    if how == "truncate":
        body = body[: data.draw(st.integers(0, len(body)))]
    elif how == "extend":
        body = body + data.draw(st.binary(min_size=1, max_size=16))
    elif how == "flip":
        pos = data.draw(st.integers(0, len(body) - 1))
        body = body[:pos] + bytes([body[pos] ^ data.draw(st.integers(1, 255))]) + body[pos + 1:]
    elif how == "header_len":
        hlen = data.draw(st.integers(-5, len(body) + 5))
    else:
        pos = data.draw(st.integers(0, len(body)))
        body = body[:pos] + data.draw(st.binary(max_size=24)) + body[pos:]
    _refused_or_ok(decode_infer_request, body, hlen, "m", "")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
tensor_dicts = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=6), json_values),
        "datatype": st.one_of(st.sampled_from(list(NUMPY_DTYPES) + ["INT3", ""]), json_values),
        "shape": st.one_of(st.lists(st.integers(-3, 2**65), max_size=4), json_values),
        "data": json_values,
        "parameters": st.one_of(st.dictionaries(st.sampled_from(["binary_data_size", "shared_memory_region",
                                                                  "shared_memory_byte_size", "x"]), json_values),
                                json_values),
    },
)


@FUZZ
@given(st.fixed_dictionaries({}, optional={"inputs": st.one_of(st.lists(tensor_dicts, max_size=3), json_values),
                                           "outputs": st.one_of(st.lists(json_values, max_size=2), json_values),
                                           "id": json_values, "parameters": json_values}),
       st.binary(max_size=32), st.booleans())
def test_http_random_json_headers_are_refused_cleanly(doc, tail, binary):
    header = json.dumps(doc).encode()  # stdlib: integers past 64 bits too, which orjson will not write
    body = header + (tail if binary else b"")
    _refused_or_ok(decode_infer_request, body, len(header) if binary else None, "m", "")


@FUZZ
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(-2, 210)))
def test_http_random_bytes_are_refused_cleanly(body, hlen):
    _refused_or_ok(decode_infer_request, body, hlen, "m", "")


@FUZZ
@given(st.lists(tensors(finite=True), min_size=1, max_size=3), st.booleans())
def test_http_response_encoding_roundtrip(ts, binary):
    assume(binary or all(dt not in ("FP16", "BF16") for dt, _ in ts))
    outs = [Tensor(f"OUT{i}", dt, arr.shape, arr, {"binary_data": binary}) for i, (dt, arr) in enumerate(ts)]
    req = InferRequest("m", outputs=[RequestedOutput(t.name, {"binary_data": binary}) for t in outs])
    if not binary and any(dt == "BYTES" and not _utf8(arr) for dt, arr in ts):
        # bytes that are not UTF-8 cannot be JSON text: refused with the advice to ask for binary
        with pytest.raises(TorporError, match="Please use binary_data=True"):
            encode_infer_response(InferResponse("m", "1", "", outs), req)
        return
    body, hlen = encode_infer_response(InferResponse("m", "1", "", outs), req)
    doc = orjson.loads(body[:hlen] if hlen is not None else body)
    offset = hlen or 0
    for (dt, arr), o in zip(ts, doc["outputs"]):
        assert o["datatype"] == dt and o["shape"] == list(arr.shape)
        if binary:
            n = o["parameters"]["binary_data_size"]
            assert _same(arr, from_raw(body[offset: offset + n], dt, arr.shape))
            offset += n
        elif dt != "BYTES":
            assert _same(arr, np.array(o["data"], dtype=NUMPY_DTYPES[dt]).reshape(arr.shape))


# -- gRPC protobuf contents ---------------------------------------------------------------------

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@FUZZ
@given(st.lists(tensors(), min_size=1, max_size=3), st.booleans())
def test_grpc_roundtrip(ts, typed):
    if typed:
        assume(all(dt in _CONTENTS for dt, _ in ts))
    msg = pb.ModelInferRequest(model_name="m")
    for i, (dt, arr) in enumerate(ts):
        t = msg.inputs.add(name=f"IN{i}", datatype=dt, shape=list(arr.shape))
        if typed:
            values = list(arr.reshape(-1)) if dt == "BYTES" else arr.reshape(-1).tolist()
            getattr(t.contents, _CONTENTS[dt]).extend(values)
        else:
            msg.raw_input_contents.append(to_raw(arr, dt))
    req, _ = decode_request(msg)
    for (dt, arr), t in zip(ts, req.inputs):
        assert _same(arr, t.data)
    # and the response path: raw_output_contents aligned with outputs, as tritonclient reads it
    resp = encode_response(InferResponse("m", "1", "", [Tensor(f"O{i}", dt, arr.shape, arr)
                                                        for i, (dt, arr) in enumerate(ts)]))
    for (dt, arr), o, raw in zip(ts, resp.outputs, resp.raw_output_contents):
        assert o.datatype == dt and tuple(o.shape) == arr.shape and _same(arr, from_raw(raw, dt, arr.shape))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(list(NUMPY_DTYPES) + ["INT3", "", "STRING"]),
                          st.lists(st.integers(-3, 2**63 - 1), max_size=4),
                          st.sampled_from(["raw", "typed", "shm", "none"])), min_size=1, max_size=3),
       st.lists(st.binary(max_size=24), max_size=4), st.data())
def test_grpc_random_messages_are_refused_cleanly(specs, raws, data):
    msg = pb.ModelInferRequest(model_name="m", model_version=data.draw(st.sampled_from(["", "1", "-1", "x", "1.5"])))
    for i, (dt, shape, how) in enumerate(specs):
        t = msg.inputs.add(name=f"IN{i}", datatype=dt, shape=shape)
        if how == "typed":
            field = data.draw(st.sampled_from(sorted(set(_CONTENTS.values()))))
            if field == "bytes_contents":
                getattr(t.contents, field).extend(data.draw(st.lists(st.binary(max_size=4), max_size=5)))
            elif field == "bool_contents":
                getattr(t.contents, field).extend(data.draw(st.lists(st.booleans(), max_size=5)))
            elif field in ("fp32_contents", "fp64_contents"):
                getattr(t.contents, field).extend(data.draw(st.lists(st.floats(width=32), max_size=5)))
            else:
                lo = 0 if field.startswith("uint") else -(2**31)
                getattr(t.contents, field).extend(data.draw(st.lists(st.integers(lo, 2**31 - 1), max_size=5)))
        elif how == "shm":
            t.parameters["shared_memory_region"].string_param = "r"
            if data.draw(st.booleans()):
                t.parameters["shared_memory_byte_size"].int64_param = data.draw(st.integers(-5, 100))
    msg.raw_input_contents.extend(raws)
    if data.draw(st.booleans()):
        msg.parameters["sequence_id"].int64_param = data.draw(st.integers(-(2**63), 2**63 - 1))
    _refused_or_ok(decode_request, msg)


@FUZZ
@given(st.binary(max_size=120))
def test_grpc_wire_bytes_either_parse_or_fail_in_protobuf(raw):
    """What gRPC hands the servicer is a parsed message; bytes protobuf cannot parse never reach
    the codec. Those it can parse are decoded or refused cleanly."""
    msg = pb.ModelInferRequest()
    try:
        msg.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError (grpc answers INTERNAL/INVALID before us)
        return
    _refused_or_ok(decode_request, msg)


def test_bytes_length_prefix_is_little_endian():
    assert serialize_bytes(np.array([b"ab"], dtype=np.object_)) == struct.pack("<I", 2) + b"ab"


@pytest.mark.parametrize("dt", FIXED)
def test_every_fixed_type_has_its_size(dt):
    arr = np.zeros((2, 3), dtype=NUMPY_DTYPES[dt])
    assert len(to_raw(arr, dt)) == 6 * NUMPY_DTYPES[dt].itemsize
