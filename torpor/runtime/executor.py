"""The executor: run a model on a device while its groups may still be arriving.

Per-group waits. `install_group_hooks(model)` registers forward pre-hooks on the model's
nn.Module (the host module; device clones copy them). A hook belongs to a *group root*: the
outermost module whose whole subtree lies in one copy group (plus, for a module whose subtree
spans several groups, a hook for the groups of its own direct tensors). Before a group root
runs, its hook makes the compute stream wait for that group's event. Hooks find the run they
belong to through a thread-local `RunState` set by `execute` (no per-module shared state,
so concurrent runs of one model on several devices never see each other's events). Outside a
run (the adapter running the module on host) the hooks do nothing.

Copies complete in order, so a run keeps a watermark: waiting for group g also covers every
earlier group, and a group already covered costs nothing. Once the resident's last event has
completed (a hit), no waits are issued at all.

Models without a module, or registered with `pipelined=False` (a forward that reads a later
child's weights without calling that child, TorchScript), wait for the whole model first.

Device-bound module. Each (model, device) gets one clone of the module (`copy.deepcopy` with
the weights left out) whose parameters and buffers are re-pointed at the resident's arena
views when a run first uses a new placement (`bind`). A hit reuses the bound clone as is.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torpor.runtime.hoststore import HostModel
from torpor.runtime.memory import Resident
from torpor.runtime.partition import submodule

_active = threading.local()


class RunState:
    __slots__ = ("device", "model", "resident", "wait_s", "waited")

    def __init__(self, resident: Resident):
        self.resident = resident
        self.model = resident.model
        self.device = resident.device
        self.waited = -1
        # seconds this run's thread spent in `wait_on_compute` (the placer's run account): on CPU
        # devices the wait for a group blocks the host; on CUDA it only enqueues a stream wait
        self.wait_s = 0.0

    def wait_through(self, gi: int) -> None:
        """Make this run's compute wait until groups 0..gi have landed (no host block on CUDA)."""
        if gi <= self.waited:
            return
        if self.resident.copy_done():
            self.waited = len(self.model.groups)
            return
        t = time.perf_counter()
        self.device.wait_on_compute(self.resident.events[gi])
        self.wait_s += time.perf_counter() - t
        self.waited = gi

    def wait_all(self) -> None:
        if self.model.groups:
            self.wait_through(len(self.model.groups) - 1)


def current_run() -> RunState | None:
    return getattr(_active, "state", None)


# ------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------


def hook_plan(module: nn.Module, model: HostModel) -> list[tuple[str, int]]:
    """(module path, last group it needs) for every module that gets a pre-hook."""
    group_of = {key: slot.group for key, slot in model.slots.items()}
    subtree: dict[str, set[int]] = {}
    direct: dict[str, set[int]] = {}
    for key, g in group_of.items():
        path, _, _ = key.rpartition(".")
        direct.setdefault(path, set()).add(g)
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            subtree.setdefault(".".join(parts[:i]), set()).add(g)
    plan: list[tuple[str, int]] = []

    def visit(path: str, mod: nn.Module) -> None:
        groups = subtree.get(path)
        if not groups:
            return
        if len(groups) == 1:
            plan.append((path, max(groups)))
            return
        if direct.get(path):
            plan.append((path, max(direct[path])))
        for name, child in mod.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", module)
    return plan


def install_group_hooks(model: HostModel) -> int:
    """Register the per-group waits on the model's module; returns the number of hooks."""
    module = model.module
    if module is None or not model.pipelined or isinstance(module, torch.jit.ScriptModule):
        return 0
    for h in model.hook_handles:
        h.remove()
    model.hook_handles.clear()
    for path, gi in hook_plan(module, model):
        target = submodule(module, path)

        def pre_hook(_mod: nn.Module, _args: Any, _gi: int = gi, _model: HostModel = model) -> None:
            state = getattr(_active, "state", None)
            if state is not None and state.model is _model:
                state.wait_through(_gi)

        model.hook_handles.append(target.register_forward_pre_hook(pre_hook))
    return len(model.hook_handles)


# ------------------------------------------------------------------------------------------------
# binding
# ------------------------------------------------------------------------------------------------


class DeviceClone:
    """A copy of the module's structure for one device whose parameters and buffers are
    placeholders, re-pointed into the arena on each new placement: `bind` does one
    `Tensor.set_(arena storage, offset, shape, stride)` per distinct tensor (tied keys share one
    object), and nothing at all when the model lands at the offsets it was last bound to."""

    def __init__(self, model: HostModel, device: torch.device):
        module = model.module
        assert module is not None
        memo: dict[int, Any] = {}
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=device), requires_grad=False)
        for b in module.buffers():
            memo[id(b)] = torch.empty(0, dtype=b.dtype, device=device)
        self.module = copy.deepcopy(module, memo)
        targets: list[torch.Tensor | None] = [None] * len(model.unique_slots)
        for key, slot in model.slots.items():
            path, _, name = key.rpartition(".")
            owner = submodule(self.module, path)
            table = owner._parameters if name in owner._parameters else owner._buffers
            t = table[name]
            if targets[slot.index] is None:
                targets[slot.index] = t
            elif t is not targets[slot.index]:
                table[name] = targets[slot.index]  # same memory on host: one object here too
        self.tensors: list[torch.Tensor] = targets  # type: ignore[assignment]
        self.plan = [
            (targets[s.index], s.dtype.itemsize, s.shape, s.stride, s.group, s.rel)
            for s in model.unique_slots
        ]
        self.bound_to: tuple[int, list[int]] | None = None  # (arena id, group offsets)
        # tensors outside the state dict (non-persistent buffers) keep their values, on the device
        keys = set(model.slots)
        for name, buf in list(module.named_buffers()):
            if name not in keys:
                path, _, attr = name.rpartition(".")
                submodule(self.module, path)._buffers[attr] = buf.to(device)

    def bind(self, resident: Resident) -> None:
        arena = resident.memory.arena
        where = (id(arena), list(resident.group_offsets))
        if where == self.bound_to:
            return  # landed where it was last bound: the tensors already point there
        storage = arena.untyped_storage()
        base = arena.storage_offset()  # bytes (uint8 arena); PAGE-aligned, so / itemsize is exact
        offsets = resident.group_offsets
        with torch.no_grad():
            for t, size, shape, stride, group, rel in self.plan:
                t.set_(storage, (base + offsets[group] + rel) // size, shape, stride)
        self.bound_to = where


def bind(resident: Resident) -> None:
    """Point the device clone of the module (or, without one, fresh views) at the resident's
    blocks; `resident.weights` maps every state_dict key to its device tensor."""
    if resident.weights is not None:
        return
    with resident.bind_lock:
        if resident.weights is not None:
            return
        model = resident.model
        module = model.module
        if module is not None and not isinstance(module, torch.jit.ScriptModule):
            clone = model.clones.get(resident.device.name)
            if clone is None:
                clone = model.clones[resident.device.name] = DeviceClone(model, resident.device.torch_device)
            clone.bind(resident)
            resident.module = clone.module
            tensors = clone.tensors
        else:
            tensors = resident.make_views()
        resident.weights = {key: tensors[s.index] for key, s in model.slots.items()}


# ------------------------------------------------------------------------------------------------
# execution (in a device worker thread)
# ------------------------------------------------------------------------------------------------


def execute(resident: Resident, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run `fn(*args, **kwargs)` on the resident's device, in a worker thread: compute stream
    current, per-group waits active, and every enqueued kernel finished before returning (the
    caller unpins the model afterwards)."""
    device = resident.device
    state = RunState(resident)
    hooked = bool(resident.model.hook_handles)
    previous = getattr(_active, "state", None)
    _active.state = state
    try:
        with device.compute_scope():
            try:
                bind(resident)  # outside inference mode: the views become ordinary tensors
                with torch.inference_mode():
                    if not hooked:
                        state.wait_all()
                    return fn(*args, **kwargs)
            finally:
                # Rule: the weights stay pinned until every kernel that may read them is done.
                device.finish_compute()
    finally:
        _active.state = previous


def to_host(value: Any) -> Any:
    """Tensors (in tuples, lists, dicts) copied to host memory; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.cpu() if value.device.type != "cpu" else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    return value


def to_device(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return device.to_device(value)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def forward(resident: Resident, args: tuple, kwargs: dict) -> Any:
    """The device clone's forward on device copies of the inputs; outputs back on host."""
    module = resident.module
    if module is None:
        raise RuntimeError(f"model {resident.key!r} was registered without a module")
    device = resident.device
    out = module(*to_device(args, device), **to_device(kwargs, device))
    return to_host(out)
