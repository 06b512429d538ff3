"""The host store: every registered model's weights, once, in host memory, as copy groups.

Each model gets one slab (a single uint8 tensor). Its copy groups (see `torpor.runtime.partition`) lie
in the slab in execution order, each a contiguous byte range; inside a group every tensor starts
at a multiple of `ALIGN` (256) bytes, so a view of any dtype is aligned, and a group's layout
is copied as it is: the device holds the same bytes at the same offsets relative to the
group's start, and a swap is one `copy_` per group, never one per tensor.

With CUDA present the slab is pinned (page-locked), so copies from it are asynchronous DMA.
Pinning is done per slab, never per tensor: the slab is ordinary host memory registered with
`cudaHostRegister` (exact size), falling back to torch's pinned allocator (which rounds sizes up
to a power of two) where registration is unavailable. `HostStore.pinned_bytes` reports it.

When the model's `nn.Module` is given, its parameters and buffers are re-pointed at views of
the slab (`adopt=True`), so the weights are not held twice; the adapter's module keeps working
on host.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torpor.runtime.partition import PartitionRule, Unit, build_units, merge_units, submodule, tensor_identity

_log = logging.getLogger("torpor.runtime.hoststore")

ALIGN = 256
PAGE = 4096


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one tensor lives inside its model's layout (offset from the slab's start)."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    group: int  # the copy group holding its bytes
    rel: int  # offset from the group's start (the same on host and device)
    index: int  # position among the model's distinct tensors (tied keys share one)
    stride: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyGroup:
    """Bytes [start, end) of the slab, copied with one `copy_` and completed by one event."""

    index: int
    name: str
    start: int
    end: int
    units: tuple[str, ...]  # module paths whose weights it holds
    keys: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


class TypedViews:
    """Views of one uint8 buffer as typed tensors at byte offsets: one `as_strided` per tensor
    (the buffer's per-dtype views are made once)."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def view(
        self,
        byte_offset: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        stride: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        entry = self._typed.get(dtype)
        if entry is None:
            size = torch.empty((), dtype=dtype).element_size()
            usable = self.buf.numel() // size * size
            typed = self.buf[:usable].view(dtype)
            entry = self._typed[dtype] = (typed, size, typed.storage_offset())
        typed, size, base = entry
        return typed.as_strided(
            shape, contiguous_stride(shape) if stride is None else stride, base + byte_offset // size
        )


def _cuda_register(t: torch.Tensor) -> bool:
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 1)  # 1: portable
        return int(rc) == 0
    except Exception as e:  # noqa: BLE001 - any failure: fall back to torch's pinned allocator
        _log.debug("cudaHostRegister unavailable: %s", e)
        return False


def _cuda_unregister(buf: torch.Tensor, ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception as e:  # noqa: BLE001 - at interpreter exit CUDA may be gone already
        _log.debug("cudaHostUnregister failed: %s", e)
    del buf


class PinnedRegion:
    """Host memory page-locked with `cudaHostRegister`. It is unregistered by `close()` or when
    this object is collected, always before the memory can be freed (the finalizer holds the
    buffer): freeing registered memory would leave the driver mapping stale pages."""

    def __init__(self, region: torch.Tensor):
        self.nbytes = region.numel()
        self._finalizer = weakref.finalize(self, _cuda_unregister, region, region.data_ptr())

    def close(self) -> None:
        self._finalizer()


def allocate_slab(nbytes: int, pin: bool) -> tuple[torch.Tensor, str, PinnedRegion | None]:
    """(slab, how it is pinned: 'registered' | 'pinned_allocator' | 'pageable', the registration
    to keep alive as long as the slab is used for DMA, if registered)."""
    nbytes = max(nbytes, 1)
    if pin:
        rounded = align(nbytes, PAGE)
        buf = torch.empty(rounded + PAGE, dtype=torch.uint8)
        pad = (-buf.data_ptr()) % PAGE
        region = buf[pad : pad + rounded]
        if _cuda_register(region):
            return region[:nbytes], "registered", PinnedRegion(region)
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), "pinned_allocator", None
        except RuntimeError as e:
            _log.warning("pinning %d bytes failed (%s); this model's host copy stays pageable", nbytes, e)
    return torch.empty(nbytes, dtype=torch.uint8), "pageable", None


class HostModel:
    """One model in the store: slab, copy groups, per-tensor slots, optional module."""

    def __init__(
        self,
        key: Any,
        slab: torch.Tensor,
        groups: list[CopyGroup],
        slots: dict[str, Slot],
        weight_bytes: int,
        pin_method: str,
        module: nn.Module | None,
        pipelined: bool,
        rule: PartitionRule,
        registered: PinnedRegion | None,
    ):
        self.key = key
        self.slab = slab
        self.groups = groups
        self.slots = slots
        self.unique_slots = sorted({s.index: s for s in slots.values()}.values(), key=lambda s: s.index)
        self.weight_bytes = weight_bytes
        self.pin_method = pin_method
        self.module = module
        self.pipelined = pipelined
        self.rule = rule
        self.views = TypedViews(slab)
        self._group_bytes = [slab[g.start : g.end] for g in groups]  # made once: no slicing per swap
        self.hook_handles: list[Any] = []
        self.clones: dict[str, Any] = {}  # device name -> torpor.runtime.executor.DeviceClone
        self._registered = registered

    @property
    def nbytes(self) -> int:
        """Layout bytes (weights plus alignment padding): what a device must hold."""
        return self.groups[-1].end if self.groups else 0

    @property
    def pinned(self) -> bool:
        return self.pin_method != "pageable"

    def group_bytes(self, g: CopyGroup) -> torch.Tensor:
        return self._group_bytes[g.index]

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """state_dict key -> a view of the slab (tied keys share one view)."""
        views = [self.views.view(s.offset, s.dtype, s.shape, s.stride) for s in self.unique_slots]
        return {key: views[s.index] for key, s in self.slots.items()}

    def close(self) -> None:
        for h in self.hook_handles:
            h.remove()
        self.hook_handles.clear()
        self.clones.clear()
        if self._registered is not None:
            self._registered.close()

    def __repr__(self) -> str:
        return f"HostModel({self.key!r}, {self.nbytes} bytes, {len(self.groups)} groups, {self.pin_method})"


def layout(
    units_per_group: list[list[Unit]], tensors: dict[str, torch.Tensor]
) -> tuple[list[CopyGroup], dict[str, Slot], list[tuple[Slot, torch.Tensor]]]:
    """Byte layout: groups back to back (each starting at ALIGN), tensors ALIGN-aligned inside.
    Returns the groups, each key's slot, and the (slot, source) pairs to fill."""
    groups: list[CopyGroup] = []
    slots: dict[str, Slot] = {}
    fills: list[tuple[Slot, torch.Tensor]] = []
    by_identity: dict[tuple, Slot] = {}
    cursor = 0
    for gi, units in enumerate(units_per_group):
        start = cursor = align(cursor)
        keys: list[str] = []
        for u in units:
            for key in u.keys:
                t = tensors[key]
                ident = tensor_identity(t)
                slot = by_identity.get(ident)
                if slot is None:
                    nbytes = t.numel() * t.element_size()
                    cursor = align(cursor)
                    shape = tuple(t.shape)
                    slot = Slot(
                        cursor,
                        nbytes,
                        t.dtype,
                        shape,
                        gi,
                        cursor - start,
                        len(fills),
                        contiguous_stride(shape),
                    )
                    cursor += nbytes
                    by_identity[ident] = slot
                    fills.append((slot, t))
                slots[key] = slot
                keys.append(key)
        groups.append(
            CopyGroup(
                gi,
                "+".join(u.prefix for u in units),
                start,
                max(cursor, start),
                tuple(u.prefix for u in units),
                tuple(keys),
            )
        )
    return groups, slots, fills


def _adopt(module: nn.Module, host: dict[str, torch.Tensor]) -> None:
    """Point the module's parameters and buffers at the slab views (tied keys stay tied)."""
    if isinstance(module, torch.jit.ScriptModule):
        return
    params: dict[int, nn.Parameter] = {}
    for key, view in host.items():
        path, _, name = key.rpartition(".")
        owner = submodule(module, path)
        if name in owner._parameters:
            p = params.get(id(view))
            if p is None:
                p = params[id(view)] = nn.Parameter(view, requires_grad=False)
            owner._parameters[name] = p
        elif name in owner._buffers:
            owner._buffers[name] = view


class HostStore:
    """Registered models' host copies. Thread-safe; loading a model touches no device."""

    def __init__(self, pin: bool | None = None, rule: PartitionRule | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.rule = rule or PartitionRule()
        self._models: dict[Any, HostModel] = {}
        self._lock = threading.Lock()

    def add(
        self,
        key: Any,
        groups: Iterable[Any],
        module: nn.Module | None = None,
        *,
        pipelined: bool = True,
        rule: PartitionRule | None = None,
        adopt: bool = True,
    ) -> HostModel:
        """Copy a model's weights into a new slab. `groups`: `LayerGroup`s (or (name, tensors)
        pairs) in execution order; `module`: the nn.Module they belong to (enables splitting
        containers, per-group waits and module re-pointing). Replaces an earlier entry."""
        rule = rule or self.rule
        pairs: list[tuple[str, dict[str, torch.Tensor]]] = []
        for g in groups:
            name, tensors = (g.name, g.tensors) if hasattr(g, "tensors") else g
            tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
            if tensors:
                pairs.append((name, tensors))
        all_tensors: dict[str, torch.Tensor] = {}
        for _, tensors in pairs:
            all_tensors.update(tensors)
        units = build_units(pairs, module, rule)
        copy_groups, slots, fills = layout(merge_units(units, rule), all_tensors)
        total = align(copy_groups[-1].end) if copy_groups else 0
        slab, method, registered = allocate_slab(total, self.pin)
        views = TypedViews(slab)
        with torch.no_grad():
            for slot, src in fills:
                if slot.nbytes:
                    views.view(slot.offset, slot.dtype, slot.shape).copy_(src.detach())
        weight_bytes = sum(s.nbytes for s, _ in fills)
        model = HostModel(
            key, slab, copy_groups, slots, weight_bytes, method, module, pipelined, rule, registered
        )
        if module is not None and adopt:
            _adopt(module, model.host_tensors())
        with self._lock:
            old = self._models.pop(key, None)
            self._models[key] = model
        if old is not None:
            old.close()
        return model

    def get(self, key: Any) -> HostModel:
        with self._lock:
            return self._models[key]

    def get_or_none(self, key: Any) -> HostModel | None:
        with self._lock:
            return self._models.get(key)

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return key in self._models

    def keys(self) -> list[Any]:
        with self._lock:
            return list(self._models)

    def remove(self, key: Any) -> None:
        with self._lock:
            model = self._models.pop(key, None)
        if model is not None:
            model.close()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(m.slab.numel() for m in self._models.values())

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(m.slab.numel() for m in self._models.values() if m.pinned)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            models = list(self._models.values())
        return {
            "models": len(models),
            "bytes": sum(m.slab.numel() for m in models),
            "pinned_bytes": sum(m.slab.numel() for m in models if m.pinned),
            "pin_methods": sorted({m.pin_method for m in models}),
        }
