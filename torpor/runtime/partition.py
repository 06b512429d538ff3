"""How a model's weights are cut into copy groups: the unit of one copy and one event.

The rule (PipeSwitch's trade-off, made explicit):

- Each copy costs a fixed overhead `c` (a `cudaMemcpyAsync` plus an event record: ~5-10 us of
  host time and DMA setup) on top of `bytes / B`. Keeping that overhead under a fraction `f` of
  the copy time needs groups of at least `c * B * (1 - f) / f` bytes: with c = 10 us,
  B = 50 GB/s (PCIe 5 pinned) and f = 5% that is ~9.5 MB. Hence `target_bytes` = 8 MiB by
  default; `PartitionRule.for_link(bandwidth)` derives it from a measured bandwidth (clamped to
  2..64 MiB).
- Smaller groups overlap better: compute on group k starts once group k has landed, and after
  the last byte arrives only the last group's compute remains. Hence not larger than needed.
- The **first** group is capped lower (`first_bytes`, 1 MiB): compute starts as soon as it has
  landed, so a small first group hides the pipeline's start-up latency.

Procedure:

1. Units: the adapter's layer groups (one per top-level child, in execution order). A unit
   larger than `split_bytes` (2 x target) whose module is a plain container (`nn.Sequential`,
   `nn.ModuleList`, `nn.ModuleDict`) is split into its children, recursively. Only containers
   are split because their forward calls each child in turn and never reads a child's weights
   directly, so a forward pre-hook per child sees every use of that child's weights. Custom
   modules stay whole (a BERT embedding block reads its children's weights directly).
2. Merge consecutive units greedily while the group stays within its cap (`first_bytes` for
   the first group, `target_bytes` after). A unit larger than the cap forms a group alone.

Measured (`python loadtest/swap_bench.py --device cuda`, H100 PCIe gen5 x16, torch 2.11): with
8 MiB groups (1 MiB first) swap-in ran at 52.4-52.8 GB/s, 97% of one plain 1 GiB pinned copy
(54.3 GB/s), for ResNet-50 (12 groups), BERT-base (14) and a 1 GB WideMLP (4); so per-copy
overhead is already negligible there and smaller groups would only add launch cost on the
host (~30 us of Python per group on the request path).

Group order is execution order (the adapters' contract), so each group's copy is issued in the
order compute needs it. Tensors shared between units (tied weights) are counted once, in the
first unit that names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MiB = 1 << 20
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True, slots=True)
class PartitionRule:
    target_bytes: int = 8 * MiB
    first_bytes: int = 1 * MiB
    split_bytes: int | None = None  # default: 2 x target_bytes

    @classmethod
    def for_link(cls, bandwidth: float, per_copy_s: float = 10e-6, overhead: float = 0.05) -> PartitionRule:
        """Target size keeping per-copy overhead under `overhead` of copy time at `bandwidth` B/s."""
        target = per_copy_s * bandwidth * (1 - overhead) / overhead
        target = int(min(max(target, 2 * MiB), 64 * MiB)) // MiB * MiB
        return cls(target_bytes=target, first_bytes=min(MiB, target))

    @property
    def split_limit(self) -> int:
        return self.split_bytes if self.split_bytes is not None else 2 * self.target_bytes


@dataclass(frozen=True, slots=True)
class Unit:
    """Weights of one module subtree (or of one module's own tensors): `prefix` is the module
    path, `keys` the state_dict keys."""

    prefix: str
    keys: tuple[str, ...]
    nbytes: int


def submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path, walking registered children only (a child may be named like
    a Module method, e.g. `half`, which `get_submodule` would resolve to the method)."""
    mod = root
    if path:
        for part in path.split("."):
            try:
                mod = mod._modules[part]
            except KeyError:
                raise AttributeError(f"{type(mod).__name__} has no child module {part!r} ({path})") from None
    return mod


def tensor_identity(t: torch.Tensor) -> tuple:
    """Same identity = same memory (tied weights), stored once."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))


def key_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes each key adds in order: 0 for a tensor already seen under an earlier key."""
    seen: set[tuple] = set()
    out = {}
    for key, t in tensors.items():
        ident = tensor_identity(t)
        out[key] = 0 if ident in seen else t.numel() * t.element_size()
        seen.add(ident)
    return out


def _split(unit: Unit, module: nn.Module | None, sizes: dict[str, int], rule: PartitionRule) -> list[Unit]:
    if module is None or unit.nbytes <= rule.split_limit or not isinstance(module, _CONTAINERS):
        return [unit]
    children = list(module.named_children())
    if not children:
        return [unit]
    out: list[Unit] = []
    claimed: set[str] = set()
    own = tuple(k for k in unit.keys if "." not in k[len(unit.prefix) + 1 :])
    if own:
        out.append(Unit(unit.prefix, own, sum(sizes[k] for k in own)))
        claimed.update(own)
    for name, child in children:
        prefix = f"{unit.prefix}.{name}"
        keys = tuple(k for k in unit.keys if k.startswith(prefix + ".") and k not in claimed)
        if not keys:
            continue
        claimed.update(keys)
        out.extend(_split(Unit(prefix, keys, sum(sizes[k] for k in keys)), child, sizes, rule))
    rest = tuple(k for k in unit.keys if k not in claimed)
    if rest:  # keys under no child (should not happen for a state_dict): keep them whole, last
        out.append(Unit(unit.prefix, rest, sum(sizes[k] for k in rest)))
    return out


def build_units(
    groups: list[tuple[str, dict[str, torch.Tensor]]], module: nn.Module | None, rule: PartitionRule
) -> list[Unit]:
    """The adapter's (name, tensors) groups as units, large container groups split."""
    all_tensors: dict[str, torch.Tensor] = {}
    for _, tensors in groups:
        all_tensors.update(tensors)
    sizes = key_bytes(all_tensors)
    units: list[Unit] = []
    for name, tensors in groups:
        unit = Unit(name, tuple(tensors), sum(sizes[k] for k in tensors))
        sub = None
        if module is not None and not isinstance(module, torch.jit.ScriptModule):
            try:
                sub = submodule(module, name)
            except AttributeError:
                sub = None
        units.extend(_split(unit, sub, sizes, rule))
    return units


def merge_units(units: list[Unit], rule: PartitionRule) -> list[list[Unit]]:
    """Consecutive units merged greedily up to the cap (smaller for the first group)."""
    out: list[list[Unit]] = []
    cur: list[Unit] = []
    cur_bytes = 0
    for u in units:
        cap = rule.first_bytes if not out else rule.target_bytes
        if cur and cur_bytes + u.nbytes > cap:
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(u)
        cur_bytes += u.nbytes
    if cur:
        out.append(cur)
    return out
