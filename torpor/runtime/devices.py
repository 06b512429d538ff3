"""Execution devices: CUDA GPUs and CPU "virtual GPUs" behind one interface.

A `Device` owns what every model on it shares (runtime sharing, no per-model context):

- a **copy stream**: CUDA: one high-priority `torch.cuda.Stream`; CPU: one copy thread that
  runs copy jobs in FIFO order. `issue_copies` enqueues byte copies in order and returns one
  event per copy (a `CopyBatch`); it never blocks the caller.
- **compute streams**: `exec_slots` worker threads, each with its own compute stream on CUDA.
  `run_in_worker(fn, *args, key=...)` queues a callable for them, served lowest `key` first
  (the scheduler's deadline order; equal keys, and the default key, first come first served);
  inside it, `wait_on_compute(event)` makes the compute
  stream wait for a copy event (CUDA: `Stream.wait_event`, the host does not block; CPU: the
  worker thread waits for the copy thread's event), and `finish_compute()` returns once the
  work enqueued by this thread has finished. The number of workers bounds how many executions
  (and so how many activation workspaces) a device runs at once.
- **events**: `torch.cuda.Event` on CUDA, `CpuEvent` (a threading.Event with callbacks) on CPU;
  both have `query()` and `synchronize()`. `await device.wait(event)` never blocks the event loop.
- an **arena**: `allocate_arena()` reserves the device's weight memory once, first-touched.

`parse_devices("cuda" | "cuda:0,1" | "cpu:2" | "auto", memory_fraction=, memory_bytes=)` reads
a `--devices` spec; `open_devices(spec)` builds the devices. A GPU may be named twice
(`cuda:0,0`): two logical devices with separate arenas on one GPU, which is how the peer-copy
path is exercised on a single GPU.

This module imports only torch (and pynvml through `torpor.runtime.topology`, optionally).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

PAGE = 4096
DEFAULT_CUDA_FRACTION = 0.7  # of free memory at start; the rest is headroom for activations
DEFAULT_CPU_BYTES = 2 << 30  # per virtual device


class CopyError(RuntimeError):
    """A copy on a device's copy stream failed; every later group of that swap fails too."""


# ------------------------------------------------------------------------------------------------
# --devices spec
# ------------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 1 << 10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 1 << 40,
}


def parse_bytes(text: str | int) -> int:
    """'4GiB', '512MB', '1.5g', '1048576' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (e.g. 4GiB, 512MB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What `--devices` asked for. `ordinals` None means every visible GPU."""

    kind: str  # "cuda" | "cpu"
    ordinals: tuple[int, ...] | None = None
    count: int = 1  # cpu virtual devices
    memory_fraction: float | None = None
    memory_bytes: int | None = None


def parse_devices(
    text: str = "auto", *, memory_fraction: float | None = None, memory_bytes: int | str | None = None
) -> DeviceSpec:
    """`auto` (cuda when it works, else cpu), `cuda`, `cuda:0,1`, `cuda:0,0`, `cpu`, `cpu:2`.
    `memory_fraction` bounds each device's arena as a fraction of the GPU's free memory (CPU: of
    available RAM, split over the virtual devices); `memory_bytes` as an absolute size."""
    text = text.strip().lower()
    if memory_fraction is not None and not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    nbytes = parse_bytes(memory_bytes) if memory_bytes is not None else None
    if nbytes is not None and nbytes <= 0:
        raise ValueError(f"memory bytes must be positive, got {memory_bytes}")
    if text in ("", "auto"):
        text = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, rest = text.partition(":")
    if kind == "gpu":
        kind = "cuda"
    if kind == "cuda":
        ordinals = None
        if rest:
            try:
                ordinals = tuple(int(x) for x in rest.split(",") if x.strip() != "")
            except ValueError:
                raise ValueError(f"bad device list in {text!r}: expected e.g. cuda:0,1") from None
            if not ordinals or min(ordinals) < 0:
                raise ValueError(f"bad device list in {text!r}")
        return DeviceSpec("cuda", ordinals, 0, memory_fraction, nbytes)
    if kind == "cpu":
        count = 1
        if rest:
            if not rest.isdigit() or int(rest) < 1:
                raise ValueError(f"bad virtual device count in {text!r}: expected e.g. cpu:2")
            count = int(rest)
        return DeviceSpec("cpu", None, count, memory_fraction, nbytes)
    raise ValueError(f"unknown device kind in {text!r}: expected cuda, cuda:0,1, cpu or cpu:N")


# ------------------------------------------------------------------------------------------------
# Events and copy batches
# ------------------------------------------------------------------------------------------------


class CpuEvent:
    """A CUDA-event look-alike for the CPU backend: set once by the copy thread."""

    __slots__ = ("_callbacks", "_done", "_error", "_lock", "t_done")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[], None]] | None = []
        self._lock = threading.Lock()
        self.t_done = 0.0

    def set(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._error = error
            self.t_done = time.perf_counter()
            self._done.set()
            callbacks, self._callbacks = self._callbacks or [], None
        for cb in callbacks:
            cb()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise CopyError(str(self._error)) from self._error

    def add_done_callback(self, cb: Callable[[], None]) -> None:
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(cb)
                return
        cb()


Event = Any  # torch.cuda.Event | CpuEvent


@dataclass(slots=True)
class CopyBatch:
    """The copies one swap issued: one event per copy, in order; the last completes last."""

    events: list[Event]
    nbytes: int
    t_issue: float
    _timing: tuple[Any, Any] | None = None  # CUDA timing events (start, end)
    _t_start: list[float] | None = None  # CPU: [start] written by the copy thread

    def done(self) -> bool:
        return not self.events or self.events[-1].query()

    def seconds(self) -> float | None:
        """Copy-stream time from the first copy's start to the last copy's end, once done."""
        if not self.done():
            return None
        if self._timing is not None:
            start, end = self._timing
            return start.elapsed_time(end) / 1e3
        if self._t_start and self.events:
            return max(0.0, self.events[-1].t_done - self._t_start[0])
        return 0.0


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------


class Device:
    """Base class; see the module docstring for the contract."""

    kind = ""

    def __init__(self, name: str, index: int, torch_device: torch.device, capacity: int, exec_slots: int):
        self.name = name
        self.index = index
        self.torch_device = torch_device
        self.capacity = int(capacity)
        self.exec_slots = max(1, int(exec_slots))
        self._tls = threading.local()
        self._slot_counter = itertools.count()
        self._workers = _OrderedWorkers(self.exec_slots, f"torpor-{name}", self._init_worker)

    # identity -----------------------------------------------------------------------------------
    @property
    def physical(self) -> tuple[str, int]:
        """Two logical devices with the same `physical` share one memory (and one link)."""
        return (self.kind, self.index)

    def can_peer(self, other: Device) -> bool:
        return False

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "capacity_bytes": self.capacity,
            "exec_slots": self.exec_slots,
        }

    # worker threads ----------------------------------------------------------------------------
    def _init_worker(self) -> None:
        self._tls.slot = next(self._slot_counter) % self.exec_slots

    def run_in_worker(self, fn: Callable[..., Any], *args: Any, key: float = math.inf) -> concurrent.futures.Future:
        return self._workers.submit(key, fn, *args)

    @property
    def busy_seconds(self) -> float:
        """Seconds its workers have spent running submitted work since start (a run's wait for
        its copy inside it included), all workers summed."""
        return self._workers.busy_s


    @contextlib.contextmanager
    def compute_scope(self) -> Iterator[None]:
        """Inside a worker: make this worker's compute stream current."""
        yield

    def wait_on_compute(self, event: Event) -> None:
        raise NotImplementedError

    def finish_compute(self) -> None:
        """Block this worker until the work it enqueued on its compute stream has finished."""

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # memory and copies ---------------------------------------------------------------------------
    def allocate_arena(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError

    def issue_copies(
        self, jobs: list[tuple[torch.Tensor, torch.Tensor, Event | None]], src_device: Device | None = None
    ) -> CopyBatch:
        """Enqueue `dst.copy_(src)` for each job, in order, on the copy stream, each after its
        optional `after` event; one event per job. Never blocks."""
        raise NotImplementedError

    async def wait(self, event: Event) -> None:
        """Wait for an event without blocking the event loop."""
        raise NotImplementedError

    def close(self) -> None:
        self._workers.shutdown()


class _OrderedWorkers:
    """A device's worker threads, serving queued callables lowest key first (ties and the
    default key in submission order). Written here because the standard library's
    ThreadPoolExecutor only serves FIFO, and the scheduler orders a device's queue by deadline
    (torpor.runtime.placer). A callable whose future was cancelled while queued is skipped."""

    def __init__(self, n: int, prefix: str, initializer: Callable[[], None]):
        self.heap: list[tuple[float, int, concurrent.futures.Future, Callable[..., Any], tuple]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closing = False
        self._initializer = initializer
        # seconds the workers spent in callables (runs, waits for copies inside them included),
        # added under the lock when a worker comes back for more: how busy the device was
        self.busy_s = 0.0
        self._threads = [threading.Thread(target=self._loop, name=f"{prefix}_{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, key: float, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closing:
                raise RuntimeError("device is closed")
            heapq.heappush(self.heap, (key, next(self._seq), fut, fn, args))
            self._cv.notify()
        return fut

    def _loop(self) -> None:
        self._initializer()
        spent = 0.0
        while True:
            with self._cv:
                self.busy_s += spent
                spent = 0.0
                while not self.heap and not self._closing:
                    self._cv.wait()
                if not self.heap:
                    return
                _, _, fut, fn, args = heapq.heappop(self.heap)
            if not fut.set_running_or_notify_cancel():
                continue
            t = time.perf_counter()
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                spent = time.perf_counter() - t
                fut.set_exception(e)
            else:
                spent = time.perf_counter() - t
                fut.set_result(result)

    def shutdown(self) -> None:
        with self._cv:
            self._closing = True
            pending, self.heap = self.heap, []
            self._cv.notify_all()
        for _, _, fut, _, _ in pending:
            fut.cancel()
        for t in self._threads:
            t.join(timeout=30)


def _aligned(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A PAGE-aligned `nbytes` slice of `buf` (allocated with PAGE bytes to spare)."""
    pad = (-buf.data_ptr()) % PAGE
    return buf[pad : pad + nbytes]


class CpuDevice(Device):
    """A virtual GPU in host memory: a fixed capacity, real copies into its own arena, a copy
    thread standing in for the copy stream and worker threads for the compute streams."""

    kind = "cpu"

    def __init__(self, index: int, capacity: int, exec_slots: int = 1):
        super().__init__(f"cpu:{index}", index, torch.device("cpu"), capacity, exec_slots)
        # Emulated link speeds (bytes/s) by source: "host" or a peer device's name. Set from a
        # topology file (torpor.runtime.links) so CPU virtual devices behave like the node it describes:
        # a copy is paced so its groups land when they would over that link. Empty: memcpy speed.
        self.link_rates: dict[str, float] = {}
        self.peers: set[str] | None = None  # names it may copy from; None: every CPU device
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._copier = threading.Thread(target=self._copy_loop, name=f"torpor-{self.name}-copy", daemon=True)
        self._copier.start()

    def can_peer(self, other: Device) -> bool:
        return isinstance(other, CpuDevice) and (self.peers is None or other.name in self.peers)

    def wait_on_compute(self, event: Event) -> None:
        event.synchronize()  # the worker thread stands in for the compute stream: it waits

    def allocate_arena(self, nbytes: int) -> torch.Tensor:
        arena = _aligned(torch.empty(nbytes + PAGE, dtype=torch.uint8), nbytes)
        arena.fill_(0)  # first touch: every page is faulted in now, not during a request's copy
        return arena

    def issue_copies(self, jobs, src_device=None) -> CopyBatch:
        events = [CpuEvent() for _ in jobs]
        t_start = [0.0]
        batch = CopyBatch(events, sum(d.numel() for d, _, _ in jobs), time.perf_counter(), None, t_start)
        rate = self.link_rates.get(src_device.name if src_device is not None else "host")
        self._jobs.put((jobs, events, t_start, rate))
        return batch

    def _copy_loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            jobs, events, t_start, rate = item
            t0 = t_start[0] = time.perf_counter()
            done_bytes = 0
            failed: BaseException | None = None
            for (dst, src, after), ev in zip(jobs, events, strict=True):
                if failed is None:
                    try:
                        if after is not None:
                            after.synchronize()  # a peer source group may itself still be arriving
                        dst.copy_(src)
                        done_bytes += dst.numel()
                        if rate:
                            lag = t0 + done_bytes / rate - time.perf_counter()
                            if lag > 0:
                                time.sleep(lag)
                    except BaseException as e:  # noqa: BLE001 - reported through the events
                        failed = e
                ev.set(failed)

    async def wait(self, event: Event) -> None:
        if not event.query():
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def wake() -> None:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

            event.add_done_callback(wake)
            await fut
        event.synchronize()  # done: raises the copy's error, if any

    def close(self) -> None:
        self._jobs.put(None)
        super().close()
        self._copier.join(timeout=5.0)


class CudaDevice(Device):
    """One logical device on a GPU: a high-priority copy stream, `exec_slots` compute streams."""

    kind = "cuda"

    def __init__(self, index: int, ordinal: int, capacity: int, exec_slots: int = 1, name: str | None = None):
        super().__init__(
            name or f"cuda:{ordinal}", index, torch.device("cuda", ordinal), capacity, exec_slots
        )
        self.ordinal = ordinal
        # Lower number = higher priority; out-of-range values clamp to the highest priority.
        self.copy_stream = torch.cuda.Stream(device=self.torch_device, priority=-64)
        self.compute_streams = [torch.cuda.Stream(device=self.torch_device) for _ in range(self.exec_slots)]
        self._waiters = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"torpor-{self.name}-wait"
        )
        self.gpu_name = torch.cuda.get_device_name(ordinal)

    @property
    def physical(self) -> tuple[str, int]:
        return ("cuda", self.ordinal)

    def can_peer(self, other: Device) -> bool:
        if not isinstance(other, CudaDevice):
            return False
        return other.ordinal == self.ordinal or torch.cuda.can_device_access_peer(self.ordinal, other.ordinal)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "gpu": self.gpu_name, "ordinal": self.ordinal}

    @property
    def _stream(self) -> torch.cuda.Stream:
        return self.compute_streams[getattr(self._tls, "slot", 0)]

    @contextlib.contextmanager
    def compute_scope(self) -> Iterator[None]:
        with torch.cuda.device(self.ordinal), torch.cuda.stream(self._stream):
            yield

    def wait_on_compute(self, event: Event) -> None:
        # Rule: kernels reading a group's weights are enqueued after this wait, so the compute
        # stream runs them only once the copy stream has passed that group's event.
        self._stream.wait_event(event)

    def finish_compute(self) -> None:
        # Rule: the caller unpins the weights after this returns; every kernel that read them
        # has then finished, so the blocks may be reused by the next copy.
        self._stream.synchronize()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.torch_device, non_blocking=True)

    def allocate_arena(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.device(self.ordinal):
            buf = torch.empty(nbytes + PAGE, dtype=torch.uint8, device=self.torch_device)
            arena = _aligned(buf, nbytes)
            arena.zero_()  # first touch, on the default stream, then wait: the arena starts clean
            torch.cuda.synchronize(self.ordinal)
        return arena

    def issue_copies(self, jobs, src_device=None) -> CopyBatch:
        s = self.copy_stream
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        events = []
        with contextlib.ExitStack() as stack:
            if isinstance(src_device, CudaDevice) and src_device.ordinal != self.ordinal:
                # P2P: torch copies on the source device's current stream and orders it against
                # the destination's current stream; make both of those our copy streams.
                stack.enter_context(torch.cuda.stream(src_device.copy_stream))
            stack.enter_context(torch.cuda.stream(s))
            start.record(s)
            for dst, src, after in jobs:
                if after is not None:
                    # Rule: a peer source group may still be arriving on its own copy stream;
                    # this copy stream reads it only after that group's event.
                    s.wait_event(after)
                # Pinned source + preallocated destination: an async DMA, no allocation, no sync.
                dst.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
                events.append(ev)
            end.record(s)
        return CopyBatch(events, sum(d.numel() for d, _, _ in jobs), time.perf_counter(), (start, end))

    async def wait(self, event: Event) -> None:
        if event.query():
            return
        # A worker thread blocks in cudaEventSynchronize (GIL released); the loop stays free.
        await asyncio.get_running_loop().run_in_executor(self._waiters, event.synchronize)

    def close(self) -> None:
        super().close()
        self._waiters.shutdown(wait=False, cancel_futures=True)


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_CPU_BYTES


def open_devices(spec: DeviceSpec | str, *, exec_slots: int = 1) -> list[Device]:
    """Build the devices a spec names, with each arena's capacity resolved (the arenas are
    allocated by `DeviceMemory`, not here)."""
    if isinstance(spec, str):
        spec = parse_devices(spec)
    if spec.kind == "cpu":
        if spec.memory_bytes is not None:
            cap = spec.memory_bytes
        elif spec.memory_fraction is not None:
            cap = int(_available_ram() * spec.memory_fraction / spec.count)
        else:
            cap = DEFAULT_CPU_BYTES
        return [CpuDevice(i, cap, exec_slots) for i in range(spec.count)]
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available (no GPU or a CPU-only torch build)")
    n = torch.cuda.device_count()
    ordinals = spec.ordinals if spec.ordinals is not None else tuple(range(n))
    bad = [o for o in ordinals if o >= n]
    if bad:
        raise ValueError(f"no CUDA device {bad[0]}: {n} visible")
    shares = {o: ordinals.count(o) for o in ordinals}
    seen: dict[int, int] = {}
    devices: list[Device] = []
    for i, o in enumerate(ordinals):
        free, _total = torch.cuda.mem_get_info(o)
        if spec.memory_bytes is not None:
            cap = min(spec.memory_bytes, int(free * 0.95 / shares[o]))
        else:
            cap = int(free * (spec.memory_fraction or DEFAULT_CUDA_FRACTION) / shares[o])
        k = seen.get(o, 0)
        seen[o] = k + 1
        name = f"cuda:{o}" if k == 0 else f"cuda:{o}/{k}"
        devices.append(CudaDevice(i, o, cap, exec_slots, name=name))
    return devices
