"""DevicePool: the swap engine's facade over devices, arenas, the host store and copies
(`torpor.runtime.device_path.DeviceRuntime` drives it for the data plane).

    pool = DevicePool(open_devices("cuda"))                 # or "cpu:2"; arenas reserved here
    pool.register("resnet50", model_fn.layer_groups(), module)   # weights -> host slab (pinned)
    async with pool.acquire("resnet50", timeout=5.0) as p:  # resident? else place + swap in
        outputs = await p.forward(x)                        # device clone, inputs in, outputs out
        # or: await p.run(lambda: model_fn.forward_tensors(inputs, p.weights))
    pool.residency()                                        # JSON-able snapshot per device
    pool.counters("resnet50")                               # swap-ins, bytes, hits, evictions...

API (all on the event loop thread; nothing here blocks the loop on a device):

- `DevicePool(devices, *, store=None, policy=None, block_bytes=2 MiB, default_timeout=30.0, lookahead=1)`
- `register(key, groups, module=None, *, pipelined=True, rule=None) -> HostModel`: copy the
  weights into the host store (no device is touched) and install the per-group hooks.
- `await unregister(key, timeout=None)`: wait for its requests, drop every device copy and the host copy.
- `acquire(key, device=None, *, timeout=None, source="auto", order=inf)` -> async context manager
  yielding a `Placement`. `device` None: a device holding the model (the least busy), else the
  one with most free plus evictable memory. The request first waits for one of the device's
  stages (`torpor.runtime.staging`), lowest `order` first, holding no memory meanwhile; staged, it pins
  the model if resident, else reserves blocks (evicting idle residents by policy, those with
  requests waiting for the device last), issues every group copy at once and returns: the copy
  runs while the request ahead executes, then under this one's own execution. Concurrent
  acquires of a model still arriving share that copy. `source`: "auto" (a peer device holding
  the model if one can copy to this one, else host), "host", "peer", or a device's name (copy
  from that device where it still holds the model: the scheduler's choice, `torpor.runtime.placer`).
  `timeout` bounds the whole wait (then `MemoryFullError`, UNAVAILABLE, "Request timeout
  expired"); without one a request waits for its stage as long as its turn takes, and then at
  most `default_timeout` for memory, which only the device's other staged requests can hold. A
  model larger than every allowed device's arena raises at once.
- `Placement.run(fn, *args, **kwargs)`: awaitable; runs `fn` in one of the device's worker
  threads with its compute stream current, per-group waits armed, and the stream synchronised
  before returning. `Placement.forward(*args, **kwargs)`: the device-bound module on device
  copies of the inputs, outputs returned on host. `Placement.weights` (in `run`): key -> arena
  view, for `torch.func.functional_call` on the registered module (whose hooks wait per group).
  `await Placement.ready()`: all groups landed. A callable that reads the views other than
  through the registered module's forward must first call `torpor.runtime.executor.current_run().wait_all()`
  (or the caller awaits `ready()`); models registered without a module always wait for all.
- `await prefetch(key, device=None, source="auto")`: place without running (scheduler use).
- `evict(key, device=None) -> int`: drop idle device copies now.
- `residency()`, `counters(key=None)`, `set_host_bandwidth(device, bytes_per_s)`.

Leaving the `async with` unpins the model and gives the stage back; if a `run` is still
executing (its awaiting task was cancelled), both happen when that run finishes, never before.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from torpor.runtime.devices import Device
from torpor.runtime.executor import execute, forward, install_group_hooks
from torpor.runtime.hoststore import HostModel, HostStore
from torpor.runtime.memory import (
    DEFAULT_BLOCK_BYTES,
    DeviceMemory,
    Epoch,
    MemoryFullError,
    Resident,
    _key_str,
)
from torpor.runtime.partition import PartitionRule
from torpor.runtime.staging import Stage, StageExpired, StageTimeout, StagingQueue
from torpor.runtime.swapper import swap_in_from_host, swap_in_from_peer
from torpor.scheduling.admission import harm_level
from torpor.scheduling.eviction import CostAwarePolicy, EvictionPolicy, RateMeter
from torpor.scheduling.scheduler import Outcome

_POLL_S = 0.002  # re-check interval while waiting for memory (copies complete without notifying)


@dataclass(slots=True)
class ModelCounters:
    requests: int = 0
    hits: int = 0  # resident and fully arrived
    joins: int = 0  # resident, copy still in flight: shared it
    misses: int = 0  # started a swap-in
    swap_ins: int = 0
    peer_swap_ins: int = 0
    bytes_moved: int = 0
    swap_seconds: float = 0.0  # copy-stream time of completed swap-ins
    last_swap_seconds: float = 0.0
    evictions: int = 0
    memory_waits: int = 0
    timeouts: int = 0
    rate: RateMeter = field(default_factory=RateMeter)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "hits": self.hits,
            "joins": self.joins,
            "misses": self.misses,
            "swap_ins": self.swap_ins,
            "peer_swap_ins": self.peer_swap_ins,
            "bytes_moved": self.bytes_moved,
            "swap_seconds": self.swap_seconds,
            "last_swap_seconds": self.last_swap_seconds,
            "evictions": self.evictions,
            "memory_waits": self.memory_waits,
            "timeouts": self.timeouts,
            "request_rate": self.rate.rate(now),
        }


class Placement:
    """A pinned resident, for the duration of an `acquire` block."""

    def __init__(self, pool: DevicePool, resident: Resident, outcome: Outcome, stage: Stage | None = None):
        self.pool = pool
        self.resident = resident
        self.outcome = outcome
        self._stage = stage  # the device stage it holds until its runs finish (torpor.runtime.staging)
        self._inflight = 0
        self._closed = False
        self._released = False

    @property
    def device(self) -> Device:
        return self.resident.device

    @property
    def key(self) -> Any:
        return self.resident.key

    @property
    def model(self) -> HostModel:
        return self.resident.model

    @property
    def weights(self) -> dict[str, Any]:
        """key -> arena view; bound in the worker before `run`'s callable starts."""
        if self.resident.weights is None:
            raise RuntimeError("Placement.weights is available inside run() (bound in the worker)")
        return self.resident.weights

    @property
    def module(self) -> nn.Module | None:
        return self.resident.module

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.run_ordered(math.inf, fn, *args, **kwargs)

    async def run_ordered(self, key: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """`run`, queued on the device by `key` (lowest first: the scheduler's deadline order)."""
        if self._closed:
            raise RuntimeError("placement already released")
        loop = asyncio.get_running_loop()
        fut = self.device.run_in_worker(execute, self.resident, fn, args, kwargs, key=key)
        self._inflight += 1
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._run_finished))
        return await asyncio.wrap_future(fut)

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        return await self.run(forward, self.resident, args, kwargs)

    async def ready(self) -> None:
        """Wait (without blocking the loop) until every group has landed."""
        events = self.resident.events
        if events:
            await self.device.wait(events[-1])

    def _run_finished(self) -> None:
        self._inflight -= 1
        if self._closed and self._inflight == 0:
            self._release()

    def _close(self) -> None:
        self._closed = True
        if self._inflight == 0:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._unpin(self.resident)
            if self._stage is not None:
                self._stage.leave()


class _Acquire:
    def __init__(self, pool: DevicePool, key: Any, device: Any, timeout: float | None, source: str, order: float,
                 on_stage: Any, defer_until: float, tag: Any, expire_at: float):
        self._args = (key, device, timeout, source, order, on_stage, defer_until, tag, expire_at)
        self._pool = pool
        self._placement: Placement | None = None

    async def __aenter__(self) -> Placement:
        self._placement = await self._pool._acquire(*self._args)
        return self._placement

    async def __aexit__(self, *exc: object) -> None:
        if self._placement is not None:
            self._placement._close()


class DevicePool:
    def __init__(
        self,
        devices: Iterable[Device],
        *,
        store: HostStore | None = None,
        policy: EvictionPolicy | None = None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        default_timeout: float = 30.0,
        lookahead: int = 1,
    ):
        self.devices = list(devices)
        if not self.devices:
            raise ValueError("DevicePool needs at least one device")
        self.epoch = Epoch()  # bumped on every residency change, on any device or in the host store
        self.memories = [DeviceMemory(d, block_bytes, self.epoch) for d in self.devices]
        self._names = {d.name for d in self.devices}
        self.store = store or HostStore(pin=any(d.kind == "cuda" for d in self.devices))
        self.policy = policy or CostAwarePolicy()
        self.default_timeout = default_timeout
        # per device: execution slots plus `lookahead` requests may hold memory at once, so the
        # next request's copy lands while the one ahead runs (torpor.runtime.staging)
        self.lookahead = max(0, lookahead)
        self.stages = {m.device.name: StagingQueue(m.device.exec_slots + self.lookahead,
                                                   blocked=self._blocker(m)) for m in self.memories}
        self._counters: dict[Any, ModelCounters] = {}
        self._waiters: list[asyncio.Future] = []
        self._removing: set[Any] = set()
        # bytes/s from host per device, for the cost-aware policy (the bench or engine may measure it)
        self.host_bandwidth = {d.name: (25e9 if d.kind == "cuda" else 5e9) for d in self.devices}

    # registration -------------------------------------------------------------------------------
    def register(
        self,
        key: Any,
        groups: Iterable[Any],
        module: nn.Module | None = None,
        *,
        pipelined: bool = True,
        rule: PartitionRule | None = None,
    ) -> HostModel:
        """Weights to the host store (blocking: a copy into the slab; call it off the loop for
        large models). A model already registered under `key` must be unregistered first."""
        if any(key in m.residents for m in self.memories):
            raise RuntimeError(f"model {key!r} is resident; unregister it first")
        model = self.store.add(key, groups, module, pipelined=pipelined, rule=rule)
        install_group_hooks(model)
        self._counters_of(key)
        self.epoch.bump()
        return model

    async def unregister(self, key: Any, timeout: float | None = None) -> None:
        self._removing.add(key)
        try:
            deadline = time.monotonic() + (self.default_timeout if timeout is None else timeout)
            while True:
                busy = False
                for m in self.memories:
                    r = m.residents.get(key)
                    if r is not None:
                        if r.evictable():
                            self._evict(m, r)
                        else:
                            busy = True
                if not busy:
                    break
                if time.monotonic() >= deadline:
                    raise MemoryFullError(f"model {_key_str(key)!r} is still in use; not unloaded")
                await self._wait_change(deadline)
            self.store.remove(key)
            self._counters.pop(key, None)
            for m in self.memories:
                m.forget(key)
            self.epoch.bump()
        finally:
            self._removing.discard(key)

    # acquisition -----------------------------------------------------------------------------------
    def acquire(
        self, key: Any, device: Any = None, *, timeout: float | None = None, source: str = "auto",
        order: float = math.inf, on_stage: Callable[[Stage | None, bool], None] | None = None,
        defer_until: float = 0.0, tag: Any = None, expire_at: float = math.inf,
    ) -> _Acquire:
        """See the module docstring. `on_stage(stage, resident)`: called once the request
        holds its stage, before it takes memory (`resident`: the model is on that device,
        landed or landing); what it raises ends the acquire (the caller's last look at whether
        the request is still worth running). `defer_until` (time.monotonic()): until then the
        request may be passed over while staging it would evict a model that others wait for
        (`torpor.runtime.staging`); `tag`: see `StagingQueue.enter`. `expire_at`: if it has no
        stage by then, `on_stage(None, resident)` is called (and its refusal raised); where it
        raises nothing, the request goes on waiting."""
        if source not in ("auto", "host", "peer") and source not in self._names:
            raise ValueError(f"source must be 'auto', 'host', 'peer' or a device name, not {source!r}")
        return _Acquire(self, key, device, timeout, source, order, on_stage, defer_until, tag, expire_at)

    async def prefetch(
        self, key: Any, device: Any = None, *, timeout: float | None = None, source: str = "auto"
    ) -> str:
        """Make the model resident (the copy may still be in flight on return); the device name.
        It takes a stage like any request, behind those already waiting."""
        async with self.acquire(key, device, timeout=timeout, source=source) as p:
            return p.device.name

    def start_copy(self, key: Any, device: Any, source: str = "auto") -> Placement | None:
        """Start bringing `key` to `device` now, pinning nothing, where that evicts only idle
        models no waiting request wants: a request that will need it is still waiting for its
        stage, and finds it landed or landing then. An unpinned `Placement` naming the
        resident and the copy's source (outcome "host" | "peer"), or None where the model is
        already there or there is no such room."""
        m = self.memory(device)
        if key in m.residents or key in self._removing:
            return None
        model = self.store.get(key)
        r = m.make_room(model, self.policy, rate=self.request_rate, bandwidth=self.host_bandwidth[m.device.name],
                        replicas=self._replicas, on_evict=self._on_evict,
                        keep=self.stages[m.device.name].waiting_keys(), spare=True)
        if r is None:
            return None
        outcome = self._swap_in(r, source)
        counters = self._counters_of(key)
        counters.swap_ins += 1
        counters.peer_swap_ins += outcome == Outcome.PEER
        counters.bytes_moved += sum(g.nbytes for g in model.groups)
        return Placement(self, r, outcome)

    def memory(self, device: Any) -> DeviceMemory:
        """By index, name, or Device."""
        for i, m in enumerate(self.memories):
            if device is m.device or device == i or device == m.device.name:
                return m
        raise KeyError(f"no device {device!r} in this pool ({[m.device.name for m in self.memories]})")

    async def _acquire(self, key: Any, device: Any, timeout: float | None, source: str, order: float,
                       on_stage: Callable[[Stage | None, bool], None] | None, defer_until: float,
                       tag: Any = None, expire_at: float = math.inf) -> Placement:
        if key in self._removing:
            raise MemoryFullError(f"model {_key_str(key)!r} is being unloaded")
        model = self.store.get(key)
        counters = self._counters_of(key)
        now = time.monotonic()
        counters.requests += 1
        allowed = [self.memory(device)] if device is not None else self.memories
        if not any(m.can_ever_hold(model) for m in allowed):
            raise MemoryFullError(
                f"model {_key_str(key)!r} needs {model.nbytes} bytes; the largest allowed device arena "
                f"holds {max(m.capacity for m in allowed)}"
            )
        # Wait for a stage on one device, holding nothing (torpor.runtime.staging); then only memory
        # held by that device's other staged requests can be in the way, and they finish.
        m = allowed[0] if len(allowed) == 1 else self._stage_memory(key, model, allowed)
        queue = self.stages[m.device.name]
        deadline = None if timeout is None else now + timeout
        try:
            try:
                stage = await queue.enter(order, deadline, key, defer_until, tag, expire_at)
            except StageExpired:
                if on_stage is not None:
                    on_stage(None, key in m.residents)  # the caller's refusal
                stage = await queue.enter(order, deadline, key, defer_until, tag)
        except StageTimeout:
            counters.timeouts += 1
            raise MemoryFullError(
                f"Request timeout expired: model {_key_str(key)!r} waited {timeout:.3g} s for its turn on "
                f"{m.device.name}"
            ) from None
        try:
            if key in self._removing or self.store.get_or_none(key) is not model:
                # unloaded (or reloaded) while it waited, holding nothing: its weights are gone
                raise MemoryFullError(f"model {_key_str(key)!r} was unloaded while the request waited")
            if on_stage is not None:
                on_stage(stage, key in m.residents)
            placement = await self._acquire_staged(key, model, m, counters, now, timeout, source, queue, stage)
        except BaseException:
            stage.leave()
            raise
        return placement

    async def _acquire_staged(self, key: Any, model: HostModel, m: DeviceMemory, counters: ModelCounters,
                              now: float, timeout: float | None, source: str, queue: StagingQueue,
                              stage: Stage) -> Placement:
        deadline = now + (self.default_timeout if timeout is None else timeout)
        waited = False
        while True:
            resident = m.residents.get(key)
            if resident is not None:
                outcome = Outcome.HIT if resident.copy_done() else Outcome.JOIN
                if outcome == Outcome.HIT:
                    counters.hits += 1
                else:
                    counters.joins += 1
                return self._pin(resident, outcome, stage)
            r = m.make_room(
                model,
                self.policy,
                rate=self.request_rate,
                bandwidth=self.host_bandwidth[m.device.name],
                replicas=self._replicas,
                on_evict=self._on_evict,
                keep=queue.waiting_keys(),
            )
            if r is not None:
                outcome = self._swap_in(r, source)
                counters.misses += 1
                counters.swap_ins += 1
                counters.peer_swap_ins += outcome == Outcome.PEER
                counters.bytes_moved += sum(g.nbytes for g in model.groups)
                return self._pin(r, outcome, stage)
            if not waited:
                waited = True
                counters.memory_waits += 1
            if time.monotonic() >= deadline:
                counters.timeouts += 1
                raise MemoryFullError(
                    f"no device memory for model {_key_str(key)!r} ({model.nbytes} bytes) on {m.device.name} "
                    f"within {deadline - now:.3g} s: every resident that would have to go is in use"
                )
            await self._wait_change(deadline)

    def _stage_memory(self, key: Any, model: HostModel, allowed: list[DeviceMemory]) -> DeviceMemory:
        """The device a request without one named queues on: a holder of the model (the least
        busy), else the one with the most room once idle residents go, else the largest."""
        def busy(m: DeviceMemory) -> int:
            st = self.stages[m.device.name]
            return st.held + st.waiting()

        holders = [m for m in allowed if key in m.residents]
        if holders:
            return min(holders, key=lambda m: (busy(m), m.device.index))
        order = self._placement_order(model, allowed)
        if order:
            return order[0]
        return max((m for m in allowed if m.can_ever_hold(model)), key=lambda m: (m.capacity, -m.device.index))

    def _blocker(self, m: DeviceMemory) -> Callable[[Any, Any], int]:
        def blocked(key: Any, wanted: Any) -> int:
            """What staging a request for `key` on `m` now would do to the requests waiting
            there (torpor.scheduling.admission.harm_level); the victims are walked only as needed."""
            victims = ((c.key, c.nbytes) for c, _ in m.victims(
                self.policy, rate=self.request_rate, bandwidth=self.host_bandwidth[m.device.name],
                replicas=self._replicas, keep=wanted, pinned=True))
            return harm_level(key, self.store.get(key).nbytes - m.free_bytes, m.residents, victims, wanted)

        return blocked

    def _placement_order(self, model: HostModel, allowed: list[DeviceMemory]) -> list[DeviceMemory]:
        scored = []
        for m in allowed:
            room = m.free_bytes + m.evictable_bytes()
            if room >= model.nbytes and m.can_ever_hold(model):
                scored.append((-room, m.device.index, m))
        return [m for _, _, m in sorted(scored, key=lambda t: t[:2])]

    def _swap_in(self, r: Resident, source: str) -> str:
        """Start the copy: from the named device where it still holds the model (the
        scheduler's choice), else from any peer that can copy directly ('auto', 'peer'),
        else from the host."""
        if source in self._names:
            src = self.memory(source).residents.get(r.key)
            if src is not None and src is not r and r.device.can_peer(src.device):
                swap_in_from_peer(r, src)
                return Outcome.PEER
        if source != "host":
            for m in self.memories:
                src = m.residents.get(r.key)
                if src is not None and src is not r and r.device.can_peer(m.device):
                    swap_in_from_peer(r, src)
                    return Outcome.PEER
        swap_in_from_host(r)
        return Outcome.HOST

    def _pin(self, r: Resident, outcome: str, stage: Stage | None = None) -> Placement:
        r.pins += 1
        r.last_used = time.monotonic()
        return Placement(self, r, outcome, stage)

    def _unpin(self, r: Resident) -> None:
        r.pins -= 1
        r.last_used = time.monotonic()
        self._account_swap(r)
        self._notify()

    # eviction ---------------------------------------------------------------------------------------
    def arrived(self, key: Any) -> None:
        """A request for `key` arrived (before the scheduler places, sheds or stages it): the
        demand eviction weighs (`request_rate`). Counted at arrival, not when a request takes
        its stage: requests shed at arrival are demand too, and when only admitted ones counted,
        a hot model whose requests were being shed looked cold, was evicted, and its next
        requests, needing a copy, were shed in turn (under the CPU overload the hottest small
        model was asked to be copied in 38% of the time against the simulator's 11%)."""
        self._counters_of(key).rate.hit(time.monotonic())

    def _counters_of(self, key: Any) -> ModelCounters:
        # get or create; not setdefault, which builds a ModelCounters on every call (per request)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = ModelCounters()
        return c

    def request_rate(self, key: Any) -> float:
        c = self._counters.get(key)
        return c.rate.rate(time.monotonic()) if c else 0.0

    def _replicas(self, key: Any) -> int:
        return sum(1 for m in self.memories if key in m.residents) - 1

    def _on_evict(self, r: Resident) -> None:
        self._account_swap(r)
        c = self._counters.get(r.key)
        if c is not None:
            c.evictions += 1

    def _evict(self, m: DeviceMemory, r: Resident) -> None:
        m.release(r)
        m.evictions += 1
        self._on_evict(r)
        self._notify()

    def evict(self, key: Any, device: Any = None) -> int:
        """Drop idle device copies of `key` now (all devices, or one); the number dropped."""
        n = 0
        for m in [self.memory(device)] if device is not None else self.memories:
            r = m.residents.get(key)
            if r is not None and r.evictable():
                self._evict(m, r)
                n += 1
        return n

    def _account_swap(self, r: Resident) -> None:
        if r.batch is None or r.swap_counted or not r.batch.done():
            return
        r.swap_counted = True
        seconds = r.batch.seconds() or 0.0
        c = self._counters.get(r.key)
        if c is not None:
            c.swap_seconds += seconds
            c.last_swap_seconds = seconds

    # waiting -----------------------------------------------------------------------------------------
    def _notify(self) -> None:
        for q in self.stages.values():
            q.poke()
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _wait_change(self, deadline: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await asyncio.wait({fut}, timeout=max(0.0, min(deadline - time.monotonic(), _POLL_S)))

    # observability ------------------------------------------------------------------------------------
    def set_host_bandwidth(self, device: Any, bytes_per_s: float) -> None:
        self.host_bandwidth[self.memory(device).device.name] = bytes_per_s

    def counters(self, key: Any = None) -> dict[str, Any]:
        """One model's counters (with `resident_on`), or all models' keyed by name."""
        now = time.monotonic()
        if key is not None:
            for m in self.memories:
                r = m.residents.get(key)
                if r is not None:
                    self._account_swap(r)
            c = self._counters.get(key) or ModelCounters()
            out = c.as_dict(now)
            out["resident_on"] = [m.device.name for m in self.memories if key in m.residents]
            return out
        return {_key_str(k): self.counters(k) for k in list(self._counters)}

    def residency(self) -> dict[str, Any]:
        """Per device its arena and residents, the host store's totals, and the epoch (read
        last: building the snapshot notices copies that have landed, which bumps it)."""
        out = {
            "policy": self.policy.name,
            "devices": [m.snapshot() for m in self.memories],
            "host": self.store.summary(),
        }
        out["epoch"] = self.epoch.value
        return out

    def close(self) -> None:
        for d in self.devices:
            d.close()
