"""The engine's request and response types, independent of HTTP and gRPC.

Front ends decode wire formats into these (numpy views of the request body where possible)
and encode responses from them; nothing here knows about JSON or protobuf.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class Tensor:
    """A named tensor. `data` is None when the tensor lives in a shared-memory region
    (`parameters` then holds shared_memory_region / _offset / _byte_size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, with its per-output parameters
    (binary_data, classification, shared_memory_region, ...)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""  # "" or "-1": the latest ready version
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    parameters: dict[str, Any] = field(default_factory=dict)
    arrival_ns: int = field(default_factory=time.monotonic_ns)
    # Triton's raw binary request (HTTP, `Inference-Header-Content-Length: 0`): the body is the
    # data of the model's only input, whose shape the engine deduces from its config; `inputs`
    # is then empty and every output defaults to binary.
    raw_input: bytes | memoryview | None = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str = ""
    outputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    # Streaming (decoupled models): `final` marks the last response of a request; a response may
    # carry no outputs (an empty final). `error` is set for a per-request failure on a stream.
    final: bool = True
    error: Exception | None = None
