"""What the TorchScript and eager adapters share: running a batch of requests through a
torch callable and mapping its inputs and outputs to the config's tensors.

Requests of one `execute` call whose inputs agree in everything but the batch dimension are
concatenated and run as one forward pass (only when the config has `max_batch_size > 0`);
the outputs are split back per request. Anything else runs request by request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from torpor.config import tensor_specs
from torpor.errors import TorporError, internal
from torpor.model import ModelFunction, ModelRequest

from .torch_tensors import to_numpy, to_torch


class TorchModelFunction(ModelFunction):
    """Subclasses set `self._callable` in `load` and implement `_arguments` and `_outputs`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_specs, self.output_specs = tensor_specs(self.config)
        self._output_types = {o.name: o.datatype for o in self.output_specs}
        self._callable: Callable[..., Any] | None = None

    # mapping, per adapter ----------------------------------------------------------------------
    def _arguments(self, inputs: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        raise NotImplementedError

    def _outputs(self, raw: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # execution ---------------------------------------------------------------------------------
    def forward_tensors(self, inputs: dict[str, torch.Tensor], target: Any = None) -> dict[str, torch.Tensor]:
        """Run the model on torch tensors; outputs by name. `target` is (callable, device) of
        a device-bound copy (the swap engine's placement); None runs the loaded module as is."""
        fn = self._callable if target is None else target[0]
        if fn is None:
            raise internal(f"model '{self.name}' is not loaded")
        if target is not None:
            inputs = {k: target[1].to_device(v) for k, v in inputs.items()}
        args, kwargs = self._arguments(inputs)
        with torch.inference_mode():
            raw = fn(*args, **kwargs)
        return self._outputs(raw)

    def execute(self, requests: list[ModelRequest]) -> list[dict[str, Any] | Exception]:
        return self.execute_on(None, requests)

    def execute_on(self, target: Any, requests: list[ModelRequest]) -> list[dict[str, Any] | Exception]:
        """`execute` on a device-bound module: `target` = (module, torpor Device). Called in the
        device's worker thread, with its compute stream current (see torpor.runtime.residency)."""
        results: list[dict[str, Any] | Exception | None] = [None] * len(requests)
        for indices in self._batches(requests):
            try:
                if len(indices) == 1:
                    results[indices[0]] = self._run_one(requests[indices[0]], target)
                else:
                    batch = [requests[i] for i in indices]
                    for i, out in zip(indices, self._run_batched(batch, target), strict=True):
                        results[i] = out
            except Exception as e:  # noqa: BLE001 - one failure fails the requests that ran together
                err = e if isinstance(e, TorporError) else internal(f"PyTorch execute failure: {e}")
                for i in indices:
                    results[i] = err
        return results  # type: ignore[return-value]

    def _run_one(self, request: ModelRequest, target: Any = None) -> dict[str, Any]:
        inputs = {name: to_torch(a, name) for name, a in request.inputs.items()}
        return self._select(request, self.forward_tensors(inputs, target), None)

    def _run_batched(self, requests: list[ModelRequest], target: Any = None) -> list[dict[str, Any]]:
        sizes = [next(iter(r.inputs.values())).shape[0] for r in requests]
        inputs = {
            name: to_torch(np.concatenate([r.inputs[name] for r in requests]), name)
            for name in requests[0].inputs
        }
        outputs = self.forward_tensors(inputs, target)
        total = sum(sizes)
        if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):
            return [self._run_one(r, target) for r in requests]  # outputs are not batch-major
        results, start = [], 0
        for request, size in zip(requests, sizes, strict=True):
            results.append(self._select(request, outputs, slice(start, start + size)))
            start += size
        return results

    def _select(self, request: ModelRequest, outputs: dict[str, torch.Tensor], rows: slice | None) -> dict:
        """The request's outputs (those it asked for; all if none), `rows` of a shared batch."""
        wanted: Sequence[str] = request.requested_outputs or list(outputs)
        result = {}
        for name in wanted:
            if name not in outputs:
                raise internal(f"output '{name}' was not produced by model '{self.name}'")
            tensor = outputs[name] if rows is None else outputs[name][rows]
            result[name] = to_numpy(tensor, self._output_types.get(name))
        return result

    def _batches(self, requests: list[ModelRequest]) -> list[list[int]]:
        """Indices of requests that can share one forward pass (same inputs up to the batch
        dimension), in arrival order."""
        if self.config.max_batch_size <= 0 or len(requests) == 1:
            return [[i] for i in range(len(requests))]
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            key: Any = tuple(sorted((n, a.shape[1:], a.dtype.str) for n, a in r.inputs.items()))
            if not key or any(a.ndim == 0 for a in r.inputs.values()):
                key = ("alone", i)
            groups.setdefault(key, []).append(i)
        return list(groups.values())


def positional_index(name: str) -> int | None:
    """`INPUT__0` / `output__3` (Triton's libtorch naming) -> the index, else None."""
    head, sep, tail = name.rpartition("__")
    if sep and head and tail.isdigit():
        return int(tail)
    return None
