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

import bisect
import enum
import itertools
import json
import logging
import re
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


class ModelConfig:
    """What `TritonPythonModel.auto_complete_config(auto_complete_model_config)` receives: the
    model's config as Triton's JSON dict. The model may fill in `max_batch_size`, inputs,
    outputs, dynamic batching and the transaction policy; what contradicts the config.pbtxt is
    refused with ValueError (Triton's rules and wording), which fails the load."""

    def __init__(self, model_config: dict | str):
        config = json.loads(model_config) if isinstance(model_config, str) else model_config
        config.setdefault("name", "")
        config.setdefault("max_batch_size", 0)
        config.setdefault("input", [])
        config.setdefault("output", [])
        self._model_config = config

    def as_dict(self) -> dict:
        return self._model_config

    def _name(self) -> str:
        return str(self._model_config.get("name", ""))

    def max_batch_size(self) -> int:
        return int(self._model_config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Raises ValueError when the config asks for a larger batch than the model allows."""
        configured = int(self._model_config.get("max_batch_size", 0))
        if configured > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {configured}, but in auto-complete-config "
                f"function for model '{self._name()}' specified max_batch_size {max_batch_size}"
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        """Dynamic batching, unless the config chose another scheduler (ValueError then)."""
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._model_config:
                raise ValueError(
                    f"Configuration specified scheduling_choice as '{other}', but auto-complete-config "
                    f"function for model '{self._name()}' tries to set scheduling_choice as "
                    "'dynamic_batching'"
                )
        self._model_config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(
                    "model transaction property in auto-complete-config function for model "
                    f"'{self._name()}' contains property other than 'decoupled'."
                )
        policy = self._model_config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            wanted = transaction_policy_dict["decoupled"]
            if "decoupled" in policy and policy["decoupled"] != wanted:
                raise ValueError(
                    f"trying to change decoupled property in auto-complete-config for model "
                    f"'{self._name()}', which is already set to '{policy['decoupled']}'."
                )
            policy["decoupled"] = wanted

    def _add(self, kind: str, tensor: dict, allowed: tuple[str, ...]) -> None:
        model = self._name()
        label = tensor.get("name", "")
        for key in tensor:
            if key not in allowed:
                names = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" and '{allowed[-1]}'"
                raise ValueError(
                    f"{kind} '{label}' in auto-complete-config function for model '{model}' contains "
                    f"property other than {names}."
                )
        for key in ("name", "data_type", "dims"):
            if key not in tensor:
                where = f"{kind} '{label}'" if key != "name" else kind
                raise ValueError(
                    f"{where} in auto-complete-config function for model '{model}' is missing '{key}' property."
                )
        for existing in self._model_config.setdefault(kind, []):
            if existing.get("name") != tensor["name"]:
                continue
            have_type = existing.get("data_type", "TYPE_INVALID")
            if have_type != "TYPE_INVALID" and have_type != tensor["data_type"]:
                raise ValueError(
                    f"unable to load model '{model}', configuration expects datatype {have_type} for "
                    f"{kind} '{tensor['name']}', model provides {tensor['data_type']}"
                )
            have_dims = [int(d) for d in existing.get("dims") or []]
            dims = [int(d) for d in tensor["dims"]]
            if have_dims and have_dims != dims:
                raise ValueError(
                    f"model '{model}', tensor '{tensor['name']}': the model expects dims {dims} but the "
                    f"model configuration specifies dims {have_dims}"
                )
            if "optional" in tensor and "optional" in existing and existing["optional"] != tensor["optional"]:
                raise ValueError(
                    f"model '{model}', tensor '{tensor['name']}': the model expects optional "
                    f"{tensor['optional']} but the model configuration specifies optional {existing['optional']}"
                )
            existing["data_type"] = tensor["data_type"]
            existing["dims"] = dims
            if "optional" in tensor:
                existing["optional"] = tensor["optional"]
            return
        self._model_config[kind].append(dict(tensor))

    def add_input(self, input: dict) -> None:
        """Declare an input; ValueError when the config declares it differently."""
        self._add("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict) -> None:
        """Declare an output; ValueError when the config declares it differently."""
        self._add("output", output, ("name", "data_type", "dims"))


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


class MetricKind(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


_KIND_NAME = {
    MetricKind.COUNTER: "TRITONSERVER_METRIC_KIND_COUNTER",
    MetricKind.GAUGE: "TRITONSERVER_METRIC_KIND_GAUGE",
    MetricKind.HISTOGRAM: "TRITONSERVER_METRIC_KIND_HISTOGRAM",
}
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The server's own families (Triton's nv_*, Torpor's torpor_*): a custom family may not take
# their names (Triton aborts on such a collision; Torpor refuses the prefixes).
RESERVED_METRIC_PREFIXES = ("nv_", "torpor_")


class _Series:
    """The value of one metric (one label set) of a family; shared by every `Metric` object
    made with the same labels, and kept for the life of the server, as in Triton."""

    __slots__ = ("buckets", "count", "counts", "labels", "sum", "value")

    def __init__(self, labels: dict[str, str], buckets: tuple[float, ...] | None):
        self.labels = labels
        self.value = 0.0
        self.buckets = buckets
        self.counts = [0] * len(buckets) if buckets is not None else None
        self.sum = 0.0
        self.count = 0


class _Family:
    __slots__ = ("description", "kind", "name", "series")

    def __init__(self, name: str, description: str, kind: MetricKind):
        self.name, self.description, self.kind = name, description, kind
        self.series: dict[tuple[tuple[str, str], ...], _Series] = {}


# Custom metrics of every python model in the process, by family name (the metrics listener
# exports them: `torpor.adapters.python_backend.custom_metric_families`).
_families: dict[str, _Family] = {}
_metrics_lock = threading.Lock()


def _metric_error(prefix: str, message: str) -> TritonModelException:
    return TritonModelException(f"{prefix}: {message}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, (str, bytes, bytearray)) or value is None:
        raise TypeError(f"{what}(): expected a number, got {type(value).__name__}")
    return float(value)


class Metric:
    """One metric (a label set) of a MetricFamily: `family.Metric(labels=..., buckets=...)`."""

    def __init__(self, family: MetricFamily, series: _Series):
        self._family_ref = weakref.ref(family)
        self._kind = family._family.kind
        self._series = series

    def _live(self, prefix: str) -> _Series:
        if self._family_ref() is None:
            raise TritonModelException(
                f"{prefix}: Invalid metric operation as the corresponding 'MetricFamily' has been deleted. "
                "The 'MetricFamily' object should be deleted AFTER its corresponding 'Metric' objects have "
                "been deleted."
            )
        return self._series

    def increment(self, value: float) -> None:
        """Add `value` (counters: not negative; not for histograms)."""
        prefix = "Failed to increment metric value"
        value = _number(value, "increment")
        series = self._live(prefix)
        if self._kind == MetricKind.HISTOGRAM:
            raise _metric_error(prefix, f"{_KIND_NAME[self._kind]} does not support Increment")
        if self._kind == MetricKind.COUNTER and value < 0:
            raise _metric_error(
                prefix,
                "TRITONSERVER_METRIC_KIND_COUNTER can only be incremented monotonically by non-negative values.",
            )
        with _metrics_lock:
            series.value += value

    def set(self, value: float) -> None:
        """Set a gauge's value."""
        prefix = "Failed to set metric value"
        value = _number(value, "set")
        series = self._live(prefix)
        if self._kind != MetricKind.GAUGE:
            raise _metric_error(prefix, f"{_KIND_NAME[self._kind]} does not support Set")
        with _metrics_lock:
            series.value = value

    def observe(self, value: float) -> None:
        """Record one observation in a histogram."""
        prefix = "Failed to observe metric value"
        value = _number(value, "observe")
        series = self._live(prefix)
        if self._kind != MetricKind.HISTOGRAM:
            raise _metric_error(prefix, f"{_KIND_NAME[self._kind]} does not support Observe")
        index = bisect.bisect_left(series.buckets, value)
        with _metrics_lock:
            if index < len(series.counts):
                series.counts[index] += 1
            series.sum += value
            series.count += 1

    def value(self) -> float:
        """A counter's or gauge's current value."""
        prefix = "Failed to get metric value"
        series = self._live(prefix)
        if self._kind == MetricKind.HISTOGRAM:
            raise _metric_error(prefix, f"{_KIND_NAME[self._kind]} does not support Value")
        with _metrics_lock:
            return series.value


class MetricFamily:
    """A custom metric family (COUNTER, GAUGE or HISTOGRAM), exported on the metrics port under
    its own name. Families are process-wide: a second family of the same name and kind is the
    same family (its first description stays); the same name with another kind is refused."""

    COUNTER = MetricKind.COUNTER
    GAUGE = MetricKind.GAUGE
    HISTOGRAM = MetricKind.HISTOGRAM

    def __init__(self, name: str, description: str, kind: MetricKind):
        prefix = "Error when creating MetricFamily"
        try:
            kind = MetricKind(kind)
        except ValueError:
            raise _metric_error(prefix, f"Unknown metric kind {kind!r}") from None
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise _metric_error(prefix, "Invalid metric name")
        if name.startswith(RESERVED_METRIC_PREFIXES):
            raise _metric_error(
                prefix, f"metric name '{name}': the prefixes {', '.join(RESERVED_METRIC_PREFIXES)} are the server's"
            )
        with _metrics_lock:
            family = _families.get(name)
            if family is None:
                family = _families[name] = _Family(name, str(description), kind)
            elif family.kind != kind:
                raise _metric_error(prefix, "Family name already exists with different type")
        self._family = family

    def Metric(self, labels: dict | None = None, buckets: list[float] | None = None) -> Metric:
        """The metric of this family with these labels (str -> str); histograms need `buckets`
        (a strictly increasing list of upper bounds)."""
        if labels is None:
            labels = {}
        if not isinstance(labels, dict):
            raise TritonModelException("Failed to create metric. Labels must be a dictionary.")
        kind = self._family.kind
        if kind == MetricKind.HISTOGRAM and buckets is None:
            raise TritonModelException("Failed to create metric. Missing required buckets.")
        if kind != MetricKind.HISTOGRAM and buckets is not None:
            raise TritonModelException("Failed to create metric. Unexpected buckets found.")
        prefix = "Error when creating Metric"
        bounds = None
        if buckets is not None:
            if not isinstance(buckets, list):
                raise TritonModelException("Failed to create metric. Buckets must be a list.")
            bounds = tuple(_number(b, "Metric") for b in buckets)
            if any(a >= b for a, b in itertools.pairwise(bounds)):
                raise _metric_error(prefix, "Bucket Boundaries must be strictly sorted")
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise _metric_error(prefix, "label names and values must be strings")
            if not _LABEL_NAME.fullmatch(key) or key.startswith("__") or (
                kind == MetricKind.HISTOGRAM and key == "le"
            ):
                raise _metric_error(prefix, f"Invalid label name '{key}'")
        key = tuple(sorted(labels.items()))
        with _metrics_lock:
            series = self._family.series.get(key)
            if series is None:
                series = self._family.series[key] = _Series(dict(labels), bounds)
        return Metric(self, series)


def _metric_families() -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    """A consistent snapshot of every custom family: (name, description, kind, samples), each
    sample (sample name, labels, value); histograms as Triton writes them (_count, _sum, then
    cumulative _bucket samples with their `le` bound)."""
    out = []
    with _metrics_lock:
        for family in _families.values():
            samples: list[tuple[str, dict[str, str], float]] = []
            for series in family.series.values():
                if family.kind != MetricKind.HISTOGRAM:
                    samples.append((family.name, series.labels, series.value))
                    continue
                samples.append((family.name + "_count", series.labels, float(series.count)))
                samples.append((family.name + "_sum", series.labels, series.sum))
                running = 0
                for bound, n in zip(series.buckets, series.counts):
                    running += n
                    samples.append((family.name + "_bucket", {**series.labels, "le": _bound(bound)}, float(running)))
                samples.append((family.name + "_bucket", {**series.labels, "le": "+Inf"}, float(series.count)))
            kind = {MetricKind.COUNTER: "counter", MetricKind.GAUGE: "gauge"}.get(family.kind, "histogram")
            out.append((family.name, family.description, kind, samples))
    return out


def _bound(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)
