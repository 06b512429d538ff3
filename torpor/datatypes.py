"""Triton datatypes: names, numpy dtypes, element sizes and the BYTES wire encoding.

BYTES tensors are numpy object arrays of `bytes`; on the wire each element is a
little-endian u32 length followed by the bytes (binary extension, gRPC raw contents, shm).
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np

from torpor.errors import invalid_arg

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# config.pbtxt names (model_config.proto DataType enum) -> protocol names
CONFIG_TO_TRITON: dict[str, str] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_BF16": "BF16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}
TRITON_TO_CONFIG = {v: k for k, v in CONFIG_TO_TRITON.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise invalid_arg(f"invalid datatype '{datatype}'") from None


def element_size(datatype: str) -> int:
    """Bytes per element; 0 for BYTES (variable)."""
    dt = numpy_dtype(datatype)
    return 0 if dt == np.object_ else dt.itemsize


def triton_datatype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.object_ or dtype.kind in ("S", "U"):
        return "BYTES"
    for name, dt in NUMPY_DTYPES.items():
        if dt == dtype:
            return name
    raise invalid_arg(f"unsupported numpy dtype {dtype}")


def num_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_INT64_MAX = 2**63 - 1


def check_shape(shape, name: str) -> None:
    """Dimensions are int64 in the protocol, and a tensor's element count (zero dimensions left
    aside, as numpy counts them) must fit too; beyond that no array can be made."""
    n = 1
    for d in shape:
        if d > _INT64_MAX:
            raise invalid_arg(f"invalid shape for input '{name}': dimension {d} is larger than an int64")
        if d:
            n *= d
    if n > _INT64_MAX // 16:
        raise invalid_arg(f"invalid shape for input '{name}': {_product_text(shape)} elements cannot be represented")


def _product_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    """Length-prefixed encoding of a BYTES tensor (row-major)."""
    parts = []
    pack = struct.Struct("<I").pack
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            item = str(item).encode("utf-8")
        parts.append(pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def deserialize_bytes(buffer, count: int | None = None) -> np.ndarray:
    """Decode length-prefixed elements; `count` (if given) must match exactly."""
    mv = memoryview(buffer)
    items = []
    offset, end = 0, len(mv)
    unpack = struct.Struct("<I").unpack_from
    while offset < end:
        if offset + 4 > end:
            raise invalid_arg("malformed BYTES tensor: truncated element length")
        (n,) = unpack(mv, offset)
        offset += 4
        if offset + n > end:
            raise invalid_arg("malformed BYTES tensor: element length exceeds the data")
        items.append(bytes(mv[offset : offset + n]))
        offset += n
    if count is not None and len(items) != count:
        raise invalid_arg(f"unexpected number of string elements {len(items)}, expecting {count}")
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def from_raw(buffer, datatype: str, shape, name: str = "") -> np.ndarray:
    """View raw little-endian bytes as a tensor of `datatype` and `shape` (no copy for fixed types)."""
    count = num_elements(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buffer, count).reshape(shape)
    dt = numpy_dtype(datatype)
    expected = count * dt.itemsize
    if len(buffer) != expected:
        what = f" for input '{name}'" if name else ""
        raise invalid_arg(
            f"unexpected total byte size {len(buffer)}{what}, expecting {expected}"
        )
    return np.frombuffer(buffer, dtype=dt, count=count).reshape(shape)


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()
