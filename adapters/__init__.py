"""Adapters: model formats -> `torpor.model.ModelFunction`.

`create_model_function` picks the adapter from the config and the version folder:

| config                                                   | adapter                                   |
|----------------------------------------------------------|-------------------------------------------|
| `backend: "python"`                                      | Triton Python backend (`<version>/model.py`) |
| `platform: "pytorch_libtorch"`                           | TorchScript (`model.pt`)                  |
| `backend: "pytorch"` + parameter `torpor.module_class`   | PyTorch eager (class + `model.safetensors`) |
| `backend: "pytorch"` + a `model.pt` in the version folder | TorchScript                              |
| neither platform nor backend                             | guessed from the files: `model.py`, `model.pt` |

The torch-based adapters are imported only when needed, so python-backend models load without
paying for `import torch`.
"""

from __future__ import annotations

from pathlib import Path

from torpor.config import parameter
from torpor.model import ModelFunction

__all__ = ["create_model_function"]

MODULE_CLASS = "torpor.module_class"  # also torpor.adapters.eager.MODULE_CLASS


def create_model_function(
    name: str, version: int, config, version_path: Path, model_path: Path
) -> ModelFunction:
    """The model function for one version folder; ValueError when no adapter fits."""
    version_path, model_path = Path(version_path), Path(model_path)
    kind = _adapter_kind(name, version, config, version_path)
    if kind == "python":
        from .python_backend import PythonModelFunction as Adapter
    elif kind == "torchscript":
        from .torchscript import TorchScriptModelFunction as Adapter
    else:
        from .eager import EagerModelFunction as Adapter
    return Adapter(name, version, config, version_path, model_path)


def _adapter_kind(name: str, version: int, config, version_path: Path) -> str:
    platform, backend = config.platform, config.backend
    filename = config.default_model_filename
    eager_class = parameter(config, MODULE_CLASS)

    if backend == "python":
        return "python"
    if platform == "pytorch_libtorch":
        return "torchscript"
    if backend in ("pytorch", "libtorch"):
        if eager_class is not None:
            return "eager"
        if (version_path / (filename or "model.pt")).is_file():
            return "torchscript"
        raise ValueError(
            f"model '{name}' version {version}: backend '{backend}' needs a TorchScript "
            f"'{filename or 'model.pt'}' in {version_path} or a '{MODULE_CLASS}' parameter "
            "naming a PyTorch eager model class"
        )
    if not platform and not backend:
        if filename.endswith(".py") or (not filename and (version_path / "model.py").is_file()):
            return "python"
        if filename.endswith(".pt") or (not filename and (version_path / "model.pt").is_file()):
            return "torchscript"
        if eager_class is not None:
            return "eager"
        raise ValueError(
            f"model '{name}': the config names no platform or backend and version {version} "
            "has neither a model.py nor a model.pt"
        )
    what = f"platform '{platform}'" if platform else f"backend '{backend}'"
    raise ValueError(
        f"model '{name}': unsupported {what}; torpor serves backend 'python' (model.py), "
        "platform 'pytorch_libtorch' (model.pt) and backend 'pytorch' (a TorchScript model.pt, "
        f"or an eager class named by the parameter '{MODULE_CLASS}')"
    )
