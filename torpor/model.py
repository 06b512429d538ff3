"""Model functions: what an adapter turns a model version directory into.

A model function holds its metadata (from config.pbtxt), knows how to execute a batch of
requests, and exposes its weights as an ordered list of layer groups so the swap engine can
move them between host and device memory group by group.

Execution contract (adapters implement it, the engine calls it):
- `execute` and `execute_decoupled` are blocking and run on a worker thread, never on the
  event loop; at most `instance_count` calls run at once per model version.
- Inputs arrive as numpy arrays (BYTES as object arrays of bytes), already validated against
  the config (names, datatypes, shapes incl. the batch dimension) and with sequence control
  tensors filled in. Outputs are returned as numpy arrays keyed by output name (torch adapters
  convert with torpor.adapters.torch_tensors.to_numpy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(slots=True)
class TensorSpec:
    """One input or output as the config declares it (dims exclude the batch dimension)."""

    name: str
    datatype: str  # protocol name: INT32, FP32, BYTES, ...
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None
    label_filename: str = ""


@dataclass(slots=True)
class LayerGroup:
    """A contiguous run of a model's layers whose weights move between memories together.
    `tensors` maps parameter/buffer names (as in the module's state_dict) to host tensors."""

    name: str
    tensors: dict[str, Any]
    nbytes: int


@dataclass(slots=True)
class ModelRequest:
    """One request as a model sees it."""

    inputs: dict[str, np.ndarray]
    requested_outputs: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    correlation_id: int | str = 0
    flags: int = 0  # SEQUENCE_START | SEQUENCE_END


SEQUENCE_START = 1
SEQUENCE_END = 2

# emit(outputs or None, error or None, final) — thread-safe, called from the worker thread.
Emit = Callable[[dict[str, Any] | None, Exception | None, bool], None]


class ModelFunction:
    """Base class for adapters. Subclasses override `load`, `execute` and, for weighted
    models, `layer_groups`."""

    platform: str = ""
    backend: str = ""
    # True when the swap engine may bind this model's weights to a device per request: it then
    # exposes `module` (an nn.Module whose state_dict keys match `layer_groups`) and implements
    # `execute_on(target, requests)` with target = (device-bound module, torpor Device).
    placeable: bool = False
    module = None
    # Set (by the adapter, at any time) when executions may wait on other work, e.g. a python
    # model calling other models through BLS: the engine then never runs it on the event loop.
    blocking: bool = False

    def __init__(self, name: str, version: int, config, version_path: Path, model_path: Path):
        self.name = name
        self.version = version
        self.config = config  # tritonclient.grpc.model_config_pb2.ModelConfig
        self.version_path = version_path
        self.model_path = model_path

    # lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Read the version directory (blocking). Raise to fail the load with that message."""

    def unload(self) -> None:
        """Release whatever `load` took."""

    # execution -----------------------------------------------------------------------------
    def execute(self, requests: list[ModelRequest]) -> list[dict[str, Any] | Exception]:
        """Run a batch; one result per request, an Exception for a request that failed."""
        raise NotImplementedError

    def execute_decoupled(self, request: ModelRequest, emit: Emit) -> None:
        """Decoupled models send 0..n responses through `emit`, the last with final=True."""
        (result,) = self.execute([request])
        if isinstance(result, Exception):
            emit(None, result, True)
        else:
            emit(result, None, True)

    def execute_on(self, target, requests: list[ModelRequest]) -> list[dict[str, Any] | Exception]:
        """`execute` with the weights bound to a device (placeable models only)."""
        raise NotImplementedError

    # weights -------------------------------------------------------------------------------
    def layer_groups(self) -> list[LayerGroup]:
        """Host-resident weights in execution order; empty for models without weights."""
        return []

    @property
    def weight_bytes(self) -> int:
        return sum(g.nbytes for g in self.layer_groups())
