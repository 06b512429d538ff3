"""Triton's rules for one inference request, apart from running it: validating the request
against the model's config into the `ModelRequest` a model function takes (shapes, datatypes,
batch, shared-memory inputs, reserved and sequence parameters), and building the response from
what the model returned (requested outputs, classification, binary and shared-memory outputs)."""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np

from torpor.datatypes import from_raw, num_elements, numpy_dtype, to_raw
from torpor.errors import internal, invalid_arg
from torpor.model import SEQUENCE_END, SEQUENCE_START, ModelRequest, TensorSpec
from torpor.registry.model_entry import ModelEntry, VersionEntry
from torpor.tensors import InferRequest, InferResponse, RequestedOutput, Tensor


class RequestRules:
    """The validation and response rules, with the engine's options and shared-memory regions."""

    def __init__(self, options: Any, shm: Any):
        self.options = options
        self.shm = shm

    def prepare(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest) -> tuple[ModelRequest, int]:
        name = entry.name
        specs = entry.input_index
        controls = entry.controls
        inputs: dict[str, np.ndarray] = {}
        max_batch = entry.max_batch_size
        limit = self.options.max_tensor_elements
        batch = None
        if request.raw_input is not None:
            request.inputs = [self._raw_input(entry, request.raw_input)]
        for t in request.inputs:
            spec = specs.get(t.name)
            if spec is None:
                if t.name in controls:
                    raise invalid_arg(f"unexpected inference input '{t.name}' for model '{name}': it is a sequence control input")
                raise invalid_arg(f"unexpected inference input '{t.name}' for model '{name}'")
            if t.name in inputs:
                raise invalid_arg(f"input '{t.name}' is specified more than once for model '{name}'")
            if t.datatype != spec.datatype:
                raise invalid_arg(
                    f"inference input '{t.name}' data-type is '{t.datatype}', but model '{name}' expects '{spec.datatype}'"
                )
            shape = t.shape if type(t.shape) is tuple else tuple(int(d) for d in t.shape)
            if shape and min(shape) < 0:
                raise invalid_arg(f"invalid shape {_shape_str(shape)} for input '{t.name}' of model '{name}'")
            if limit > 0 and prod(shape) > limit:
                raise invalid_arg(f"input '{t.name}' of model '{name}' has {num_elements(shape)} elements, more than "
                                  f"the server's maximum of {limit} (--max-tensor-elements)")
            expected = spec.reshape if spec.reshape is not None else spec.dims
            body = shape
            if max_batch > 0:
                if len(shape) == 0:
                    raise invalid_arg(f"unexpected shape for input '{t.name}' for model '{name}'. Expected {_shape_str((-1,) + tuple(expected))}, got {_shape_str(shape)}. ")
                if batch is None:
                    batch = shape[0]
                elif shape[0] != batch:
                    raise invalid_arg(
                        f"input '{t.name}' batch size does not match other inputs for '{name}'"
                    )
                body = shape[1:]
            if body != expected and (len(body) != len(expected)
                                     or any(e != -1 and e != d for e, d in zip(expected, body))):
                full = ((-1,) + tuple(expected)) if max_batch > 0 else tuple(expected)
                raise invalid_arg(
                    f"unexpected shape for input '{t.name}' for model '{name}'. Expected {_shape_str(full)}, got {_shape_str(shape)}. "
                )
            inputs[t.name] = self._input_array(t, shape, name)
        missing = [n for n in entry.required if n not in inputs] if len(inputs) < len(entry.inputs) else None
        if missing:
            got = sorted(inputs)
            raise invalid_arg(
                f"expected {len(entry.inputs)} inputs but got {len(inputs)} inputs for model '{name}'. "
                f"Got input(s) {got}, but missing required input(s) {missing}. Please provide all required input(s)."
            )
        if max_batch > 0:
            batch = batch if batch is not None else 1
            if batch < 1 or batch > max_batch:
                raise invalid_arg(f"inference request batch-size must be <= {max_batch} for '{name}'")
        else:
            batch = 1
        # Reshape to the model's own dims where the config declares a reshape.
        for s in entry.reshaped:
            if s.name in inputs:
                lead = (batch,) if max_batch > 0 else ()
                inputs[s.name] = inputs[s.name].reshape(lead + tuple(s.dims))

        params = request.parameters
        if params:
            for k in params:
                if k.startswith("triton_"):
                    raise invalid_arg(
                        f"parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified: '{k}'"
                    )
            corr = params.get("sequence_id", 0)
            flags = (SEQUENCE_START if params.get("sequence_start") else 0) | (
                SEQUENCE_END if params.get("sequence_end") else 0
            )
            custom = {k: v for k, v in params.items() if k not in _ENGINE_PARAMS}
        else:
            corr, flags, custom = 0, 0, {}
        if controls:
            self._fill_controls(entry, inputs, controls, corr, flags, batch)
        return (
            ModelRequest(
                inputs=inputs,
                requested_outputs=self._output_names(entry, request),
                parameters=custom,
                id=request.id,
                correlation_id=corr,
                flags=flags,
            ),
            batch,
        )

    @staticmethod
    def _output_names(entry: ModelEntry, request: InferRequest) -> list[str]:
        """The outputs the request asks for (all of the model's where it names none), each
        known to the model, named once, with a valid `classification` parameter."""
        if not request.outputs:
            return [s.name for s in entry.outputs]
        output_names = [o.name for o in request.outputs]
        if len(set(output_names)) != len(output_names):
            seen: set[str] = set()
            for o in output_names:
                if o in seen:  # Triton refuses it since 2.69 (older ones merged the two)
                    raise invalid_arg(f"output '{o}' already exists in request")
                seen.add(o)
        for ro in request.outputs:
            if ro.name not in entry.output_index:
                raise invalid_arg(f"unexpected inference output '{ro.name}' for model '{entry.name}'")
            k = ro.parameters.get("classification") if ro.parameters else None
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise invalid_arg(f"invalid value for 'classification' parameter of output '{ro.name}', "
                                  f"expected an integer >= 0")
        return output_names

    @staticmethod
    def _raw_input(entry: ModelEntry, raw: bytes | memoryview) -> Tensor:
        """The only input of a raw binary request, its shape deduced from the config as Triton's
        core does (InferenceRequest::Normalize): the batch dimension is 1, one variable-sized
        dimension takes what the byte count leaves; BYTES takes the whole body as its one element."""
        name = entry.name
        if len(entry.inputs) != 1:
            raise invalid_arg(f"Raw request must only have 1 input (found 1) to be deduced but got "
                              f"{len(entry.inputs)} inputs in '{name}' model configuration")
        spec = entry.inputs[0]
        shape = [1] if entry.max_batch_size > 0 else []
        variable = None
        count = 1
        for d in spec.dims:
            if d == -1:
                if variable is not None:
                    raise invalid_arg(f"The shape of the raw input '{spec.name}' can not be deduced because there "
                                      "are more than one variable-sized dimension")
                variable = len(shape)
            else:
                count *= d
            shape.append(d)
        if spec.datatype == "BYTES":
            if variable is not None or count != 1:
                raise invalid_arg(f"For BYTE datatype raw input '{spec.name}', the model must have input shape [1]")
            arr = np.empty(1, dtype=np.object_)
            arr[0] = bytes(raw)
            return Tensor(spec.name, "BYTES", tuple(shape), arr.reshape(shape))
        itemsize = numpy_dtype(spec.datatype).itemsize
        if variable is not None:
            shape[variable] = len(raw) // (count * itemsize) if count else 0
        expected = prod(shape) * itemsize
        if len(raw) != expected:
            raise invalid_arg(f"input byte size mismatch for input '{spec.name}' for model '{name}'. "
                              f"Expected {expected}, got {len(raw)}")
        return Tensor(spec.name, spec.datatype, tuple(shape), from_raw(raw, spec.datatype, shape, spec.name))

    def _input_array(self, t: Tensor, shape: tuple[int, ...], model: str) -> np.ndarray:
        if t.data is not None:
            arr = t.data
            if arr.shape != shape:
                if arr.size != num_elements(shape):
                    raise invalid_arg(
                        f"unexpected number of elements {arr.size} for input '{t.name}' for model '{model}', expecting {num_elements(shape)}"
                    )
                arr = arr.reshape(shape)
            return arr
        region = t.parameters.get("shared_memory_region")
        if region is None:
            raise invalid_arg(f"input '{t.name}' for model '{model}' has no data")
        size = int(t.parameters.get("shared_memory_byte_size", 0))
        offset = int(t.parameters.get("shared_memory_offset", 0))
        raw = self.shm.read(str(region), offset, size)
        arr = from_raw(raw, t.datatype, shape, t.name)
        # Copy out of the client's region: the client may reuse it as soon as we answer.
        return arr.copy() if t.datatype != "BYTES" else arr

    # sequence batcher ----------------------------------------------------------------------
    def _fill_controls(self, entry, inputs, controls, corr, flags, batch) -> None:
        name = entry.name
        if corr in (0, "", None):
            raise invalid_arg(
                f"inference request to model '{name}' must specify a non-zero or non-empty correlation ID"
            )
        if flags & SEQUENCE_START:
            entry.active_sequences.add(corr)
        elif corr not in entry.active_sequences:
            raise invalid_arg(
                f"inference request for sequence {corr} to model '{name}' must specify the START flag on the first request of the sequence"
            )
        if flags & SEQUENCE_END:
            entry.active_sequences.discard(corr)
        lead = (batch, 1) if entry.max_batch_size > 0 else (1,)
        for cname, (kind, vals, dt) in controls.items():
            if kind == "CONTROL_SEQUENCE_START":
                v = vals[1] if flags & SEQUENCE_START else vals[0]
            elif kind == "CONTROL_SEQUENCE_END":
                v = vals[1] if flags & SEQUENCE_END else vals[0]
            elif kind == "CONTROL_SEQUENCE_READY":
                v = vals[1]
            elif kind == "CONTROL_SEQUENCE_CORRID":
                if dt == "BYTES":
                    arr = np.empty(lead, dtype=np.object_)
                    arr.fill(str(corr).encode())
                    inputs[cname] = arr
                    continue
                try:
                    v = int(corr)
                except (TypeError, ValueError):
                    raise invalid_arg(f"sequence ID must be an integer for model '{name}'") from None
            else:
                continue
            inputs[cname] = np.full(lead, v, dtype=numpy_dtype(dt))

    # execution -----------------------------------------------------------------------------

    def build_response(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest, result: dict, batch: int) -> InferResponse:
        specs = entry.output_index
        wanted = request.outputs if request.outputs else [_ALL_OF[s.name] for s in entry.outputs if s.name in result]
        outputs = []
        for ro in wanted:
            spec = specs[ro.name]
            if ro.name not in result:
                raise internal(f"model '{entry.name}' did not produce output '{ro.name}'")
            arr = result[ro.name]
            if type(arr) is not np.ndarray:
                arr = np.asarray(arr)  # adapters hand back numpy (torpor.model contract)
            self._check_output(entry, spec, arr, batch)
            datatype = spec.datatype
            if datatype == "BYTES":
                if arr.dtype != np.object_:
                    arr = _as_bytes_array(arr)
            else:
                dt = numpy_dtype(datatype)
                if arr.dtype != dt:
                    arr = arr.astype(dt)
            oparams = ro.parameters
            k = oparams.get("classification") if oparams else None
            if k:
                arr = self._classify(entry, spec, arr, int(k))
                datatype = "BYTES"
            region = oparams.get("shared_memory_region") if oparams else None
            if region is not None:
                if k:
                    raise invalid_arg("classification output cannot be returned in shared memory")
                size = int(ro.parameters.get("shared_memory_byte_size", 0))
                offset = int(ro.parameters.get("shared_memory_offset", 0))
                self.shm.write(str(region), offset, size, to_raw(arr, datatype))
                outputs.append(Tensor(ro.name, datatype, tuple(arr.shape), None, dict(ro.parameters)))
            else:
                outputs.append(Tensor(ro.name, datatype, arr.shape, arr, dict(oparams) if oparams else {}))
        return InferResponse(entry.name, str(ve.version), request.id, outputs)

    def _check_output(self, entry: ModelEntry, spec: TensorSpec, arr: np.ndarray, batch: int) -> None:
        """A model's output must have the shape its config declares (the reshape or the dims,
        -1 matching anything) and stay within the element limit: a wrong answer is the model's
        failure, reported as such, never passed on to the client."""
        lead = (batch,) if entry.max_batch_size > 0 else ()
        shape = arr.shape
        for dims in (spec.reshape, spec.dims):
            if dims is None:
                continue
            expected = lead + dims
            if shape == expected or (len(shape) == len(expected)
                                     and all(e < 0 or e == d for e, d in zip(expected, shape))):
                break
        else:
            want = lead + tuple(spec.reshape if spec.reshape is not None else spec.dims)
            raise internal(f"model '{entry.name}' returned output '{spec.name}' with shape {_shape_str(shape)}, "
                           f"but its config expects {_shape_str(want)}")
        limit = self.options.max_tensor_elements
        if limit > 0 and arr.size > limit:
            raise internal(f"model '{entry.name}' returned output '{spec.name}' with {arr.size} elements, more than "
                           f"the server's maximum of {limit} (--max-tensor-elements)")

    def _classify(self, entry: ModelEntry, spec: TensorSpec, arr: np.ndarray, k: int) -> np.ndarray:
        if arr.dtype == np.object_:
            raise invalid_arg(f"class result not available for output '{spec.name}' due to unsupported type 'BYTES'")
        labels = entry.labels.get(spec.name, [])
        batched = entry.max_batch_size > 0
        rows = arr.reshape(arr.shape[0], -1) if batched else arr.reshape(1, -1)
        k = min(k, rows.shape[1])
        out = np.empty((rows.shape[0], k), dtype=np.object_)
        is_int = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
        for b, row in enumerate(rows):
            order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
            for j, idx in enumerate(order):
                val = str(int(row[idx])) if is_int else f"{float(row[idx]):f}"
                s = f"{val}:{idx}"
                if idx < len(labels):
                    s += f":{labels[idx]}"
                out[b, j] = s.encode()
        return out if batched else out.reshape(k)


class _AllOutputs(dict):
    """A parameterless RequestedOutput per output name, made once: a request that names no
    outputs gets every output, and need not build these each time."""

    def __missing__(self, name: str) -> RequestedOutput:
        ro = self[name] = RequestedOutput(name, {})
        return ro


_ALL_OF = _AllOutputs()

# request parameters the engine consumes; the rest reach the model
_ENGINE_PARAMS = frozenset(("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"))


def _shape_str(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _as_bytes_array(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1)):
        flat[i] = v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else str(v).encode())
    return out
