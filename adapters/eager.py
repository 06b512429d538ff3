"""PyTorch eager models: a model class plus a safetensors weights file.

Config (`backend: "pytorch"`):

    parameters { key: "torpor.module_class" value: { string_value: "torpor.adapters.networks:ResNet50" } }
    # optional: keyword arguments for the class, a JSON object
    parameters { key: "torpor.module_kwargs" value: { string_value: "{\"num_classes\": 10}" } }
    # optional: an integer seed; generate the weights file when it is missing
    parameters { key: "torpor.generate_weights" value: { string_value: "0" } }

- `torpor.module_class` is `package.module:Class` (imported) or `file.py:Class`, a file looked up
  first in the version folder, then in the model folder, and loaded by path.
- The weights are `<version>/model.safetensors` (or `default_model_filename` if it names a
  `.safetensors` file), keys as the module's `state_dict()`. When the file is missing and
  `torpor.generate_weights` is set, the class is instantiated under `torch.manual_seed(seed)`
  (without disturbing the global RNG) and its state dict is written there first; that is how the
  bundled networks get their weights (weights are never committed).
- Inputs are passed to `forward()` positionally in config input order (a missing optional input
  is passed as None); the result (a tensor, a tuple/list, or a dict keyed by output name) is
  mapped to the config outputs in config output order.

Layer groups: one per top-level child module, in registration order, keyed by the exact
state_dict keys (see `torpor.adapters.weights`). `self.module` is the nn.Module with its weights in
host memory; `forward_tensors(inputs, weights)` runs it with other (e.g. device-resident)
weights through `torch.func.functional_call`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch

from torpor.config import parameter
from torpor.errors import internal
from torpor.model import LayerGroup

from .torch_execution import TorchModelFunction
from .weights import load_safetensors, module_layer_groups, save_safetensors

_log = logging.getLogger("torpor.adapters.eager")

MODULE_CLASS = "torpor.module_class"
MODULE_KWARGS = "torpor.module_kwargs"
GENERATE_WEIGHTS = "torpor.generate_weights"
WEIGHTS_FILENAME = "model.safetensors"


class EagerModelFunction(TorchModelFunction):
    platform = ""
    backend = "pytorch"

    placeable = True  # the swap engine binds its weights to a device per request

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.module: torch.nn.Module | None = None
        self._loaded_module_name: str | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def load(self) -> None:
        cls = self._resolve_class()
        kwargs = self._module_kwargs()
        path = self.weights_path
        if not path.exists():
            seed = parameter(self.config, GENERATE_WEIGHTS)
            if seed is None or seed == "":
                raise FileNotFoundError(
                    f"model '{self.name}' version {self.version}: weights file {path} not found "
                    f"(set parameter '{GENERATE_WEIGHTS}' to a seed to generate it)"
                )
            try:
                seed_value = int(seed)
            except ValueError:
                raise ValueError(
                    f"parameter '{GENERATE_WEIGHTS}' must be an integer seed, got '{seed}'"
                ) from None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_value)
                module = cls(**kwargs)
            save_safetensors(module.state_dict(), path)
        else:
            module = self._instantiate_with_weights(cls, kwargs, load_safetensors(path))
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"model '{self.name}': '{parameter(self.config, MODULE_CLASS)}' did not build an nn.Module"
            )
        module.eval()
        module.requires_grad_(False)
        self.module = module
        self._callable = module

    def unload(self) -> None:
        self.module = None
        self._callable = None
        if self._loaded_module_name:
            sys.modules.pop(self._loaded_module_name, None)
            self._loaded_module_name = None

    @property
    def weights_path(self) -> Path:
        filename = self.config.default_model_filename
        if not filename.endswith(".safetensors"):
            filename = WEIGHTS_FILENAME
        return self.version_path / filename

    def layer_groups(self) -> list[LayerGroup]:
        """Built on each call from the module's current state_dict, so the groups follow the
        module if its host tensors are replaced (e.g. by pinned copies)."""
        return [] if self.module is None else module_layer_groups(self.module)

    # execution ---------------------------------------------------------------------------------
    def forward_tensors(
        self,
        inputs: dict[str, torch.Tensor],
        target: Any = None,
        *,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run on torch tensors; with `weights` (state_dict key -> tensor, e.g. on a device) the
        module's own host weights are replaced for this call only. `target`: see the base class."""
        if weights is None:
            return super().forward_tensors(inputs, target)
        if self.module is None:
            raise internal(f"model '{self.name}' is not loaded")
        args, kwargs = self._arguments(inputs)
        with torch.inference_mode():
            raw = torch.func.functional_call(self.module, weights, tuple(args), kwargs, strict=False)
        return self._outputs(raw)

    def _arguments(self, inputs: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        args = [inputs.get(spec.name) for spec in self.input_specs]
        while args and args[-1] is None:  # trailing optional inputs: let forward() use its defaults
            args.pop()
        return args, {}

    def _outputs(self, raw: Any) -> dict[str, torch.Tensor]:
        names = [spec.name for spec in self.output_specs]
        if isinstance(raw, torch.Tensor):
            raw = (raw,)
        if isinstance(raw, dict):
            missing = [n for n in names if n not in raw]
            if missing:
                raise internal(f"model '{self.name}' returned outputs {sorted(raw)}, missing {missing}")
            return {n: raw[n] for n in names}
        if isinstance(raw, (tuple, list)):
            if len(raw) < len(names):
                raise internal(
                    f"model '{self.name}' returned {len(raw)} outputs, the config declares {len(names)}"
                )
            return dict(zip(names, raw, strict=False))  # extra elements are ignored
        raise internal(f"model '{self.name}' returned {type(raw).__name__}, expected tensors")

    # loading helpers -------------------------------------------------------------------------
    def _module_kwargs(self) -> dict[str, Any]:
        text = parameter(self.config, MODULE_KWARGS) or ""
        if not text.strip():
            return {}
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"parameter '{MODULE_KWARGS}' is not valid JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise TypeError(f"parameter '{MODULE_KWARGS}' must be a JSON object")
        return kwargs

    def _resolve_class(self) -> type[torch.nn.Module]:
        spec = parameter(self.config, MODULE_CLASS)
        if not spec or ":" not in spec:
            raise ValueError(
                f"model '{self.name}': parameter '{MODULE_CLASS}' must be 'module:Class' or "
                f"'file.py:Class', got {spec!r}"
            )
        where, _, attr = spec.rpartition(":")
        if where.endswith(".py"):
            module = self._load_file(where)
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as e:
                raise ValueError(f"model '{self.name}': cannot import '{where}': {e}") from None
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"model '{self.name}': '{where}' has no attribute '{attr}'")
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)) and not callable(obj):
            raise TypeError(f"model '{self.name}': '{spec}' is not an nn.Module class")
        return obj

    def _load_file(self, filename: str):
        for folder in (self.version_path, self.model_path):
            path = folder / filename
            if path.is_file():
                break
        else:
            raise ValueError(
                f"model '{self.name}': {filename} found in neither {self.version_path} nor {self.model_path}"
            )
        unique = re.sub(r"\W", "_", f"torpor_model_{self.name}_{self.version}_{path.stem}")
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"model '{self.name}': cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module  # dataclasses and pickling look classes up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(unique, None)
            raise
        self._loaded_module_name = unique
        return module

    @staticmethod
    def _instantiate_with_weights(
        module_class, kwargs: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> torch.nn.Module:
        """Build the module without running its initialisers (on the meta device) and adopt the
        loaded tensors; classes that create tensors the state dict does not cover (non-persistent
        buffers, plain tensor attributes) are built for real and the weights copied in."""
        try:
            with torch.device("meta"):
                module = module_class(**kwargs)
            module.load_state_dict(state, strict=True, assign=True)
            if not _has_meta_tensors(module):
                return module
        except Exception as e:  # noqa: BLE001 - any failure here means: build it for real
            _log.debug("meta-device construction of %s failed: %s", module_class, e)
        module = module_class(**kwargs)
        module.load_state_dict(state, strict=True)
        return module


def _has_meta_tensors(module: torch.nn.Module) -> bool:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta:
            return True
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and value.is_meta:
                return True
    return False
