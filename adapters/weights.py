"""Weights of PyTorch models as layer groups, and safetensors files.

Layer-group rule (shared by the eager and TorchScript adapters): one group per top-level child
module, in registration order, named after the child (`conv1`, `layer1`, ..., `fc`). A group's
`tensors` maps the exact `state_dict()` keys under that child (`layer1.0.conv1.weight`, ...)
to the module's own host tensors (no copies). Parameters and buffers registered directly on
the root module form a first group named `_root`. Children without weights give no group.
A tensor that appears under several keys (tied weights) is listed under each key but counted
in `nbytes` only where it appears first, so the groups' `nbytes` add up to the model's bytes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from torpor.model import LayerGroup

ROOT_GROUP = "_root"


def group_state_dict(state: dict[str, torch.Tensor], child_names: list[str]) -> list[LayerGroup]:
    """Split a state dict into groups by top-level prefix, in `child_names` order."""
    buckets: dict[str, dict[str, torch.Tensor]] = {ROOT_GROUP: {}}
    for child in child_names:
        buckets[child] = {}
    for key, tensor in state.items():
        prefix = key.split(".", 1)[0] if "." in key else ROOT_GROUP
        buckets.setdefault(prefix if prefix in buckets else ROOT_GROUP, {})[key] = tensor
    seen: set[tuple[int, int, torch.dtype, tuple[int, ...]]] = set()
    groups = []
    for name, tensors in buckets.items():
        if not tensors:
            continue
        nbytes = 0
        for t in tensors.values():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
            if ident in seen:
                continue
            seen.add(ident)
            nbytes += t.numel() * t.element_size()
        groups.append(LayerGroup(name=name, tensors=tensors, nbytes=nbytes))
    return groups


def module_layer_groups(module: torch.nn.Module) -> list[LayerGroup]:
    return group_state_dict(module.state_dict(), [name for name, _ in module.named_children()])


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read into memory (`load_file` only maps the file)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write atomically (a concurrent load never sees half a file). Tied tensors are written
    once per key, which safetensors requires."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o644)  # readable by a server running as another user (containers)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
