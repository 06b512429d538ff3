"""TorchScript models: `platform: "pytorch_libtorch"` (or `backend: "pytorch"` with a `model.pt`).

The version folder holds `model.pt` (or `default_model_filename`), loaded with
`torch.jit.load` onto the CPU.

Inputs, as Triton's libtorch backend names them:
- every config input is named `<anything>__<i>` (`INPUT__0`, `input__1`): input i is forward()'s
  i-th argument;
- otherwise, when every config input is the name of a forward() argument, inputs are passed by
  keyword;
- otherwise they are passed positionally in config order.

Outputs: a tensor, a tuple/list, or a dict. With `<anything>__<i>` names output i is element i of
the returned tuple; with a dict each output is looked up by its name; otherwise tuple elements
map to the config outputs in order.

Layer groups: the module's state_dict split per top-level child (see `torpor.adapters.weights`).
Pipelined swapping inside a TorchScript graph is not supported; the groups serve accounting
and whole-model moves.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from torpor.errors import internal
from torpor.model import LayerGroup

from .torch_execution import TorchModelFunction, positional_index
from .weights import module_layer_groups

DEFAULT_FILENAME = "model.pt"


class TorchScriptModelFunction(TorchModelFunction):
    platform = "pytorch_libtorch"
    backend = "pytorch"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.module: torch.jit.ScriptModule | None = None
        self._input_mode = "config-order"
        self._input_index: dict[str, int] = {}
        self._output_index: dict[str, int] | None = None

    @property
    def model_file(self):
        return self.version_path / (self.config.default_model_filename or DEFAULT_FILENAME)

    def load(self) -> None:
        path = self.model_file
        if not path.is_file():
            raise FileNotFoundError(f"model '{self.name}' version {self.version}: {path} not found")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated; the format is still Triton's
            module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        self.module = module
        self._callable = module
        self._plan_inputs(module)
        self._plan_outputs()

    def unload(self) -> None:
        self.module = None
        self._callable = None

    def layer_groups(self) -> list[LayerGroup]:
        """Built on each call from the module's current state_dict, so the groups follow the
        module if its host tensors are replaced (e.g. by pinned copies)."""
        return [] if self.module is None else module_layer_groups(self.module)

    # mapping -----------------------------------------------------------------------------------
    def _plan_inputs(self, module) -> None:
        names = [spec.name for spec in self.input_specs]
        indices = {n: positional_index(n) for n in names}
        if names and all(i is not None for i in indices.values()):
            self._input_mode = "indexed"
            self._input_index = {n: i for n, i in indices.items() if i is not None}
            return
        try:
            arguments = [a.name for a in module.forward.schema.arguments][1:]  # drop self
        except (AttributeError, RuntimeError):  # no schema: fall back to config order
            arguments = []
        if names and all(n in arguments for n in names):
            self._input_mode = "keyword"
        else:
            self._input_mode = "config-order"
            self._input_index = {n: i for i, n in enumerate(names)}

    def _plan_outputs(self) -> None:
        names = [spec.name for spec in self.output_specs]
        indices = {n: positional_index(n) for n in names}
        if names and all(i is not None for i in indices.values()):
            self._output_index = {n: i for n, i in indices.items() if i is not None}
        else:
            self._output_index = {n: i for i, n in enumerate(names)}

    def _arguments(self, inputs: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        if self._input_mode == "keyword":
            return [], dict(inputs)
        args: list[Any] = [None] * (max(self._input_index.values(), default=-1) + 1)
        for name, tensor in inputs.items():
            if name in self._input_index:
                args[self._input_index[name]] = tensor
        while args and args[-1] is None:
            args.pop()
        return args, {}

    def _outputs(self, raw: Any) -> dict[str, torch.Tensor]:
        names = [spec.name for spec in self.output_specs]
        if isinstance(raw, dict):
            missing = [n for n in names if n not in raw]
            if missing:
                raise internal(f"model '{self.name}' returned outputs {sorted(raw)}, missing {missing}")
            return {n: raw[n] for n in names}
        if isinstance(raw, torch.Tensor):
            raw = (raw,)
        if not isinstance(raw, (tuple, list)):
            raise internal(f"model '{self.name}' returned {type(raw).__name__}, expected tensors")
        assert self._output_index is not None
        out = {}
        for name in names:
            i = self._output_index[name]
            if i >= len(raw):
                raise internal(
                    f"model '{self.name}': output '{name}' is element {i} but the model returned {len(raw)}"
                )
            out[name] = raw[i]
        return out
