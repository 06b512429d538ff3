"""Torpor's implementation of the `triton_python_backend_utils` API.

Python-backend models (`model.py` with `TritonPythonModel`) do
`import triton_python_backend_utils as pb_utils`; importing `torpor.adapters.python_backend`
registers this module under that name, so such models run unmodified. Models run in the
server process (on a worker thread), not in a separate stub process as in Triton.

What is here: Tensor, InferenceRequest, InferenceResponse, InferenceResponseSender, TritonError,
TritonModelException, Logger, ModelConfig (auto-complete helper), the config lookup helpers,
the datatype conversions, BYTES (de)serialisation and the flag constants. Business Logic
Scripting (`InferenceRequest(...).exec()` / `async_exec()`) works when the server installs a
handler with `set_bls_handler` (`torpor serve` does: `torpor.adapters.bls`); otherwise it returns a
response with an UNSUPPORTED error. Names (model, tensor, request id, requested outputs) may be
given as bytes, as Triton's binding takes them (e.g. a BLS model name read from a BYTES input).

Custom metrics (`MetricFamily` / `Metric`: counter, gauge, histogram, with labels) live in a
process-wide registry that `torpor serve` exports on the metrics port under their own names
(`torpor.adapters.python_backend.custom_metric_families`); as in Triton, a family of an existing
name and kind is that family, and a metric stays exported after its objects are dropped.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2

# TRITONSERVER_DataType codes, as `Tensor.triton_dtype()` reports them
TYPE_INVALID = 0
TYPE_BOOL = 1
TYPE_UINT8 = 2
TYPE_UINT16 = 3
TYPE_UINT32 = 4
TYPE_UINT64 = 5
TYPE_INT8 = 6
TYPE_INT16 = 7
TYPE_INT32 = 8
TYPE_INT64 = 9
TYPE_FP16 = 10
TYPE_FP32 = 11
TYPE_FP64 = 12
TYPE_STRING = 13
TYPE_BF16 = 14

_BF16 = np.dtype(ml_dtypes.bfloat16)

_CODE_TO_NUMPY: dict[int, Any] = {
    TYPE_BOOL: np.bool_,
    TYPE_UINT8: np.uint8,
    TYPE_UINT16: np.uint16,
    TYPE_UINT32: np.uint32,
    TYPE_UINT64: np.uint64,
    TYPE_INT8: np.int8,
    TYPE_INT16: np.int16,
    TYPE_INT32: np.int32,
    TYPE_INT64: np.int64,
    TYPE_FP16: np.float16,
    TYPE_FP32: np.float32,
    TYPE_FP64: np.float64,
    TYPE_STRING: np.object_,
    TYPE_BF16: ml_dtypes.bfloat16,
}

# config names -> numpy types, as the python backend's models look them up
TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
    "TYPE_BF16": ml_dtypes.bfloat16,
}

# protocol datatype names <-> codes
_NAME_TO_CODE = {
    "BOOL": TYPE_BOOL,
    "UINT8": TYPE_UINT8,
    "UINT16": TYPE_UINT16,
    "UINT32": TYPE_UINT32,
    "UINT64": TYPE_UINT64,
    "INT8": TYPE_INT8,
    "INT16": TYPE_INT16,
    "INT32": TYPE_INT32,
    "INT64": TYPE_INT64,
    "FP16": TYPE_FP16,
    "FP32": TYPE_FP32,
    "FP64": TYPE_FP64,
    "BYTES": TYPE_STRING,
    "BF16": TYPE_BF16,
}
_CODE_TO_NAME = {v: k for k, v in _NAME_TO_CODE.items()}


def triton_to_numpy_type(data_type: int):
    """TRITONSERVER_DataType code -> numpy type (None for an unknown code)."""
    return _CODE_TO_NUMPY.get(data_type)


_DTYPE_TO_CODE: dict = {}  # memo: Tensor() calls this for every tensor on the infer path


def numpy_to_triton_type(data_type) -> int | None:
    """numpy dtype or type -> TRITONSERVER_DataType code (None if unsupported)."""
    code = _DTYPE_TO_CODE.get(data_type)
    if code is None:
        code = _DTYPE_TO_CODE[data_type] = _numpy_to_triton_type(data_type)
    return code


def _numpy_to_triton_type(data_type) -> int | None:
    try:
        dt = np.dtype(data_type)
    except TypeError:
        return None
    if dt == np.object_ or dt.kind == "S":
        return TYPE_STRING
    if dt == _BF16:
        return TYPE_BF16
    for code, np_type in _CODE_TO_NUMPY.items():
        if code not in (TYPE_STRING, TYPE_BF16) and dt == np.dtype(np_type):
            return code
    return None


def _text(value: Any) -> Any:
    """A name as Triton's binding takes it: bytes (a BYTES tensor element) decode as UTF-8."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.str_):
        return str(value)
    return value


def triton_string_to_numpy(triton_type_string: str):
    """'TYPE_INT32' -> np.int32."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def datatype_to_code(datatype: str) -> int:
    """Protocol datatype name ('INT32', 'BYTES') -> TRITONSERVER_DataType code."""
    return _NAME_TO_CODE.get(datatype, TYPE_INVALID)


def code_to_datatype(code: int) -> str:
    return _CODE_TO_NAME.get(code, "INVALID")


def serialize_byte_tensor(input_tensor: np.ndarray):
    """A BYTES tensor as one buffer of u32-length-prefixed elements (row-major), returned as a
    0-d object array holding that `bytes` (as tritonclient does); None for an empty or
    non-BYTES tensor. str elements are UTF-8 encoded, other objects by their str()."""
    if input_tensor.size == 0:
        return None
    if input_tensor.dtype != np.object_ and input_tensor.dtype.kind != "S":
        return None
    pack = struct.Struct("<I").pack
    parts = []
    for item in input_tensor.reshape(-1, order="C"):
        if isinstance(item, bytes):
            data = item
        elif isinstance(item, (bytearray, memoryview, np.bytes_)):
            data = bytes(item)
        else:
            data = str(item).encode("utf-8")
        parts.append(pack(len(data)))
        parts.append(data)
    return np.asarray(b"".join(parts), dtype=np.object_)


def deserialize_bytes_tensor(encoded_tensor) -> np.ndarray:
    """The inverse of `serialize_byte_tensor` (takes its result, bytes, or a uint8 array):
    a 1-D object array of bytes."""
    if isinstance(encoded_tensor, np.ndarray):
        buf = encoded_tensor.item() if encoded_tensor.dtype == np.object_ else encoded_tensor.tobytes()
    else:
        buf = bytes(encoded_tensor)
    items = []
    offset, end = 0, len(buf)
    unpack = struct.Struct("<I").unpack_from
    while offset < end:
        (n,) = unpack(buf, offset)
        offset += 4
        items.append(buf[offset : offset + n])
        offset += n
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


class TritonError:
    """An error carried by an InferenceResponse."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL):
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class TritonModelException(Exception):
    """Raised by this API (and by models) for a failed operation."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self._message = message

    def message(self) -> str:
        return self._message


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------


class Tensor:
    """A named tensor of an InferenceRequest or InferenceResponse, held as a numpy array
    in host memory."""

    def __init__(self, name: str, numpy_array: Any = None, triton_dtype: int | None = None):
        name = _text(name)
        if not isinstance(numpy_array, np.ndarray):
            if hasattr(numpy_array, "__dlpack__"):
                numpy_array = _numpy_from_dlpack(numpy_array)
            else:
                raise TritonModelException(
                    f"Tensor '{name}': expected a numpy array, got {type(numpy_array).__name__}"
                )
        if numpy_array.dtype.kind == "U" or (numpy_array.dtype.kind == "V" and numpy_array.dtype != _BF16):
            raise TritonModelException(
                "Tensor dtype used for numpy_array is not supported by Python backend. "
                "Please use np.object_ instead."
            )
        if triton_dtype is not None:
            want = triton_to_numpy_type(triton_dtype)
            if want is None:
                raise TritonModelException(f"Tensor '{name}': unknown triton_dtype {triton_dtype}")
            if numpy_array.dtype != np.dtype(want):
                numpy_array = numpy_array.view(want)  # reinterpret, as Triton does
        else:
            triton_dtype = numpy_to_triton_type(numpy_array.dtype)
            if triton_dtype is None:
                raise TritonModelException(
                    f"Tensor '{name}': numpy dtype {numpy_array.dtype} is not supported"
                )
        self._name = name
        self._array = numpy_array
        self._triton_dtype = triton_dtype

    @classmethod
    def _wrap(cls, name: str, array: np.ndarray) -> Tensor:
        """A request tensor from an array the server already validated (no checks)."""
        code = numpy_to_triton_type(array.dtype)
        if code is None:
            return cls(name, array)
        tensor = cls.__new__(cls)
        tensor._name = name
        tensor._array = array
        tensor._triton_dtype = code
        return tensor

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int:
        return self._triton_dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        """A DLPack capsule of the tensor's memory (not for BYTES)."""
        if self._triton_dtype == TYPE_STRING:
            raise TritonModelException("DLPack does not support BYTES tensors")
        return _torch_view(self._array).__dlpack__()

    def __dlpack__(self, stream=None, **kwargs):
        if self._triton_dtype == TYPE_STRING:
            raise TritonModelException("DLPack does not support BYTES tensors")
        return _torch_view(self._array).__dlpack__()

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU

    @staticmethod
    def from_dlpack(name: str, capsule) -> Tensor:
        """A Tensor from a DLPack capsule or any object with `__dlpack__` (copied to host)."""
        return Tensor(name, _numpy_from_dlpack(capsule))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {code_to_datatype(self._triton_dtype)}, {self.shape()})"


def _torch_view(array: np.ndarray):
    import torch

    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    if array.dtype == _BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _numpy_from_dlpack(obj) -> np.ndarray:
    import torch
    from torch.utils.dlpack import from_dlpack

    tensor = from_dlpack(obj)
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(_BF16)
    return tensor.numpy()


# --------------------------------------------------------------------------------------------
# requests and responses
# --------------------------------------------------------------------------------------------


class InferenceResponse:
    def __init__(
        self,
        output_tensors: list[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict | str | None = None,
    ):
        if output_tensors is None:
            output_tensors = []
        if not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        if error is not None and not isinstance(error, TritonError):
            error = TritonError(str(error))
        if isinstance(parameters, str):
            parameters = json.loads(parameters) if parameters else {}
        self._outputs = output_tensors
        self._error = error
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


class _SendState:
    """The delivery side of a response sender: forwards sends to a callback, remembers
    whether the final flag went out, and sends it when the sender is dropped without it."""

    def __init__(self, deliver: Callable[[InferenceResponse | None, int], None]):
        self._deliver = deliver
        self._lock = threading.Lock()
        self.closed = False
        self.cancelled = False

    def send(self, response: InferenceResponse | None, flags: int) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is not final."
            )
        with self._lock:
            if self.closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            if final:
                self.closed = True
            self._deliver(response, flags)

    def close_with(self, action: Callable[[], None]) -> bool:
        """Run `action` as the request's last delivery, unless the final flag already went out."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            action()
            return True

    def close_if_open(self) -> None:
        self.close_with(lambda: self._deliver(None, TRITONSERVER_RESPONSE_COMPLETE_FINAL))


class InferenceResponseSender:
    """Sends responses for one request (decoupled models send 0..n, then the final flag)."""

    def __init__(self, state: _SendState):
        self._state = state
        # Dropping the last reference without a final flag completes the request anyway.
        finalizer = weakref.finalize(self, state.close_if_open)
        finalizer.atexit = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        self._state.send(response, flags)

    def is_cancelled(self) -> bool:
        return self._state.cancelled


_bls_handler: Any = None
_sender_lock = threading.Lock()  # a lazily created sender is created once


def set_bls_handler(handler: Any) -> None:
    """Install the server's BLS entry point (None removes it): an object with
    `exec(request, decoupled)` and `async exec(request, decoupled)` (`torpor.adapters.bls.BlsBridge`)."""
    global _bls_handler
    _bls_handler = handler


def _unsupported_bls(decoupled: bool):
    response = InferenceResponse(
        error=TritonError("BLS requests are not supported by this server", TritonError.UNSUPPORTED)
    )
    return iter([response]) if decoupled else response


class InferenceRequest:
    """A request as a model receives it, or (constructed by a model) a BLS request."""

    def __init__(
        self,
        model_name: str = "",
        requested_output_names: list[str] | None = None,
        inputs: list[Tensor] | None = None,
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        timeout: int = 0,
        model_version: int = -1,
        parameters: dict | str | None = None,
        preferred_memory: Any = None,
        trace: Any = None,
    ):
        if isinstance(parameters, str):
            parameters = json.loads(parameters) if parameters else {}
        self._model_name = _text(model_name)
        self._model_version = model_version
        self._requested = [_text(n) for n in requested_output_names or []]
        self._inputs = list(inputs or [])
        self._request_id = _text(request_id)
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = dict(parameters or {})
        self._sender: InferenceResponseSender | None = None
        self._make_sender: Callable[[], InferenceResponseSender] | None = None
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL

    @classmethod
    def _incoming(
        cls,
        model_name: str,
        model_version: int,
        requested_output_names: list[str],
        inputs: list[Tensor],
        request_id: str,
        correlation_id: int | str,
        flags: int,
        parameters: dict,
        make_sender: Callable[[], InferenceResponseSender] | None,
    ) -> InferenceRequest:
        """A request as the server hands it to `execute`: the lists and dict are taken as they
        are (not copied); the response sender is created by `make_sender` on first use."""
        request = cls.__new__(cls)
        request._model_name = model_name
        request._model_version = model_version
        request._requested = requested_output_names
        request._inputs = inputs
        request._request_id = request_id
        request._correlation_id = correlation_id
        request._flags = flags
        request._timeout = 0
        request._parameters = parameters
        request._sender = None
        request._make_sender = make_sender
        request._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL
        return request

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def requested_output_names(self) -> list[str]:
        return self._requested

    def parameters(self) -> str:
        return json.dumps(self._parameters, default=str)

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            with _sender_lock:
                if self._sender is None:
                    if self._make_sender is None:
                        raise TritonModelException("this request has no response sender")
                    self._sender = self._make_sender()
        return self._sender

    def is_cancelled(self) -> bool:
        return self._sender is not None and self._sender.is_cancelled()

    def set_release_flags(self, flags: int) -> None:
        if flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE:
            raise TritonModelException("request rescheduling is not supported by torpor")
        self._release_flags = flags

    # BLS -------------------------------------------------------------------------------------
    def exec(self, decoupled: bool = False):
        """Run this request on another model and wait: one InferenceResponse, or with
        `decoupled=True` an iterator of them (the last may be empty). Failures of the called
        model come back as the response's error, as in Triton."""
        handler = _bls_handler
        if handler is None:
            return _unsupported_bls(decoupled)
        return handler.exec(self, decoupled)

    async def async_exec(self, decoupled: bool = False):
        """`exec` as an awaitable, for `async def execute`."""
        handler = _bls_handler
        if handler is None:
            return _unsupported_bls(decoupled)
        return await handler.async_exec(self, decoupled)


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for entry in model_config.get("input", []):
        if entry.get("name") == name:
            return entry
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for entry in model_config.get("output", []):
        if entry.get("name") == name:
            return entry
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


# --------------------------------------------------------------------------------------------
# auto-complete helper
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# logging and metrics
# --------------------------------------------------------------------------------------------

_log = logging.getLogger("torpor.python_backend")


class LogLevel:
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


class Logger:
    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        py_level = {
            LogLevel.INFO: logging.INFO,
            LogLevel.WARNING: logging.WARNING,
            LogLevel.ERROR: logging.ERROR,
            LogLevel.VERBOSE: logging.DEBUG,
        }.get(level, logging.INFO)
        _log.log(py_level, "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        _log.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.debug("%s", message)


# Split out for size; models see them as pb_utils.ModelConfig, pb_utils.MetricFamily, ... (imported
# last: they use TritonModelException, defined above).

from torpor.adapters.pb_config import ModelConfig  # noqa: E402, F401 - re-exported for models
from torpor.adapters.pb_metrics import (  # noqa: E402, F401 - re-exported for models
    RESERVED_METRIC_PREFIXES,
    Metric,
    MetricFamily,
    MetricKind,
    _metric_families,
)
