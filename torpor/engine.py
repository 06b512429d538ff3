"""The Engine: the one seam between the protocol front ends and the models.

Front ends decode a request into `InferRequest`, call `Engine.infer` (or `infer_stream` for
decoupled models) and encode the `InferResponse`. The engine resolves the model version,
validates inputs against the config, fills sequence-control tensors, runs the model function on
a worker thread (never blocking the event loop), selects and post-processes outputs
(classification, shared memory) and keeps Triton-shaped statistics. Model lifecycle (load,
unload, readiness, repository index) lives here too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from .admission import defer_deadline, outlasted, shed_at_arrival, shed_when_staged
from .config import (
    ModelConfig,
    config_to_dict,
    parameter,
    parse_config_json,
    read_config,
    sequence_controls,
    tensor_specs,
)
from .costmodel import slo_seconds
from .datatypes import from_raw, num_elements, numpy_dtype, to_raw
from .errors import Status, TorporError, internal, invalid_arg, unavailable, unsupported
from .model import SEQUENCE_END, SEQUENCE_START, ModelFunction, ModelRequest, TensorSpec
from .repository import ModelSource, Repository, available_versions, select_versions
from .settings import LogSettings, TraceSettings
from .shm import SharedMemoryManager
from .stats import ModelStats, empty_stats
from .tensors import InferRequest, InferResponse, RequestedOutput, Tensor

log = logging.getLogger("torpor")

TRITON_VERSION = "2.73.0"
EXTENSIONS = [
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "cuda_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
]

# Adapter factory: (name, version, config, version_path, model_path) -> ModelFunction.
# Injected so the engine does not import the adapters package (adapters depend on torpor).
Factory = Callable[[str, int, ModelConfig, Path, Path], ModelFunction]


@dataclass
class EngineOptions:
    model_repositories: list[str] = field(default_factory=lambda: ["examples/models"])
    model_control_mode: str = "none"  # none | explicit | poll
    load_models: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    strict_readiness: bool = True
    strict_model_config: bool = False
    server_id: str = "triton"
    allow_client_shm: bool = False
    # Code in a load request's `file:` contents (python-backend models, .py files): refused
    # unless allowed, since whoever may load models could otherwise run anything in the server.
    allow_override_code: bool = False
    # Limits: requests of one model version waiting for an instance beyond those executing
    # (a config's dynamic_batching.default_queue_policy.max_queue_size wins; 0: unbounded), and
    # elements in one input or output tensor.
    max_queue_size: int = 1024
    max_tensor_elements: int = 1 << 28
    worker_threads: int = 0  # 0: min(32, cpu_count + 4)
    # The swap engine: "" runs models where they are loaded (host); "cuda", "cuda:0,1", "cpu",
    # "cpu:2" bind weighted models to those devices late, per request (torpor.residency).
    devices: str = ""
    device_memory_fraction: float | None = None
    device_memory_bytes: str | None = None
    # The scheduler (torpor.placer): its policy, the links it plans with (a topology file or
    # short form, torpor.links; None: measured at start), and the latency objective of models
    # whose config has no `torpor.slo_ms` (None: no objective, the fastest option wins).
    scheduler: str = "torpor"
    device_bandwidths: str | None = None
    default_slo_ms: float | None = None
    profile_runs: int = 2  # timed runs per device-bound model at load (after one warm-up); 0: none
    # Overload (requests with a latency objective only): answer at once, UNAVAILABLE with
    # Triton's full-queue text, a request the scheduler predicts will finish past its objective
    # wherever it goes, and one already past it when its turn on the device comes. False:
    # serve them late, behind every request that can still be on time.
    shed_late: bool = True
    stage_lookahead: int = 1  # requests per device holding memory beyond those running (torpor.staging)


@dataclass
class VersionEntry:
    version: int
    state: str = "UNKNOWN"  # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""
    function: ModelFunction | None = None
    stats: ModelStats | None = None
    slots: asyncio.Semaphore | None = None  # one per model instance
    capacity: int = 1  # the slots' count
    pool_key: tuple | None = None  # registered with the DevicePool: runs on a device, late-bound
    gate: InlineGate = field(default_factory=lambda: InlineGate())


class InlineGate:
    """Decides whether a model's `execute` may run on the event loop itself.

    Why: handing a request to a worker thread costs tens of microseconds of GIL hand-off,
    more than a trivial model's whole execution. A model runs inline only after it has shown,
    over PROBE threaded runs, a mean thread CPU time under THRESHOLD_NS (inflated about 3x on
    a worker thread by cache and GIL effects, so the bar is set above the inline cost) and a
    median wall time under WALL_NS: a model that sleeps or waits on I/O uses little CPU but
    would stall the loop, and its threaded runs show it (the median, because a few runs of a
    cheap model wait long for the GIL on a busy server).

    Inline runs are judged by what the loop loses, wall time, but only where the model is to
    blame: a run over BAILOUT_NS is a strike if it spent that long computing (thread CPU time)
    or gave up the CPU of its own accord (a voluntary context switch: sleep, I/O, a lock).
    A run that was merely preempted, which on a busy machine happens every few hundred runs,
    is not the model's doing. STRIKES strikes within one window of WINDOW inline runs send the
    model back to the thread pool; it is probed again after REPROBE_S (doubling each time) and
    stays on threads for good after MAX_BANS, so a model that can block stalls the loop a
    bounded number of times.
    """

    PROBE = 32
    THRESHOLD_NS = 200_000
    WALL_NS = 1_000_000
    BAILOUT_NS = 2_000_000
    STRIKES = 3
    WINDOW = 256
    REPROBE_S = 30.0
    MAX_BANS = 4

    __slots__ = ("banned", "bans", "inline", "inline_runs", "retry_at", "runs", "strikes", "total_ns", "walls")

    def __init__(self):
        self.runs = 0
        self.total_ns = 0
        self.walls: list[int] = []
        self.inline = False
        self.banned = False
        self.strikes = 0
        self.inline_runs = 0
        self.bans = 0
        self.retry_at = 0.0

    def record(self, cpu_ns: int, wall_ns: int, blocked: bool = False) -> None:
        if self.inline:
            self.inline_runs += 1
            if self.inline_runs >= self.WINDOW:
                self.inline_runs = self.strikes = 0
            if wall_ns > self.BAILOUT_NS and (blocked or cpu_ns > self.BAILOUT_NS // 2):
                self.strikes += 1
                if self.strikes >= self.STRIKES:
                    self.inline, self.banned = False, True
                    self.bans += 1
                    self.retry_at = time.monotonic() + self.REPROBE_S * 2 ** (self.bans - 1)
            return
        if self.banned:
            if self.bans >= self.MAX_BANS or time.monotonic() < self.retry_at:
                return
            self.banned = False
            self.runs = self.total_ns = self.strikes = self.inline_runs = 0
            self.walls = []
        if self.runs >= self.PROBE:
            return
        self.runs += 1
        self.total_ns += cpu_ns
        self.walls.append(wall_ns)
        if self.runs == self.PROBE:
            median_wall = sorted(self.walls)[self.PROBE // 2]
            self.walls = []
            if self.total_ns / self.PROBE < self.THRESHOLD_NS and median_wall < self.WALL_NS:
                self.inline = True


@dataclass
class ModelEntry:
    """A model the repository knows, loaded or not."""

    name: str
    source: ModelSource | None = None
    config: ModelConfig | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    error: str = ""  # a failure before any version could be considered (config, policy)
    override_dir: Path | None = None  # temp folder holding `file:` overrides
    labels: dict[str, list[str]] = field(default_factory=dict)
    active_sequences: set = field(default_factory=set)
    mtime: float = 0.0
    # Derived from the config once (set_config), so the infer path does no config walking.
    input_index: dict[str, TensorSpec] = field(default_factory=dict)
    output_index: dict[str, TensorSpec] = field(default_factory=dict)
    controls: dict[str, tuple[str, Any, str]] = field(default_factory=dict)
    decoupled: bool = False
    max_batch_size: int = 0
    reshaped: tuple[TensorSpec, ...] = ()  # inputs whose config declares a reshape
    required: tuple[str, ...] = ()  # inputs a request must carry

    def set_config(self, config: ModelConfig) -> None:
        self.config = config
        self.inputs, self.outputs = tensor_specs(config)
        self.input_index = {s.name: s for s in self.inputs}
        self.output_index = {s.name: s for s in self.outputs}
        self.controls = sequence_controls(config)
        self.decoupled = bool(config.model_transaction_policy.decoupled)
        self.max_batch_size = int(config.max_batch_size)
        self.reshaped = tuple(s for s in self.inputs if s.reshape is not None)
        self.required = tuple(s.name for s in self.inputs if not s.optional)
        self.max_queue_size = int(config.dynamic_batching.default_queue_policy.max_queue_size)
        # the model's own latency objective (validated at load); the server default applies without it
        raw = parameter(config, "torpor.slo_ms")
        self.slo_ms = float(raw) if raw not in (None, "") else None
        # dynamic batching on a device's queue: None (off), else the max queue delay in seconds
        self.batching = (config.dynamic_batching.max_queue_delay_microseconds / 1e6
                         if config.max_batch_size > 0 and config.HasField("dynamic_batching") else None)

    def ready_versions(self) -> list[int]:
        return sorted(v for v, e in self.versions.items() if e.state == "READY")


def _unknown(name: str, detail: str) -> TorporError:
    return TorporError(Status.NOT_FOUND, f"Request for unknown model: {detail}")


def _shape_str(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


class Engine:
    def __init__(self, options: EngineOptions, factory: Factory):
        self.options = options
        self.factory = factory
        self.repository = Repository(options.model_repositories)
        self.models: dict[str, ModelEntry] = {}
        self.shm = SharedMemoryManager(options.allow_client_shm)
        self.trace = TraceSettings()
        self.logging = LogSettings()
        workers = options.worker_threads or min(32, (os.cpu_count() or 1) + 4)
        self.workers = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="torpor-exec")
        self.devices = None  # torpor.residency.DevicePool when --devices names any (the swap engine)
        self.placer = None  # torpor.placer.Placer over those devices: the scheduler's seam
        self._batches: dict[tuple, _DeviceBatch] = {}  # (model key, device) -> batch still open
        self.live = False
        self.exiting = False
        self._poll_task: asyncio.Task | None = None
        self._lifecycle_lock: asyncio.Lock | None = None
        self.inflight = 0
        self._idle: asyncio.Event | None = None

    # ---------------------------------------------------------------------------------------
    # start / stop
    # ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.options.devices and self.options.devices != "none":
            # Imported here: the swap engine needs torch, the rest of the engine does not.
            from .devices import open_devices, parse_devices
            from .residency import DevicePool

            spec = parse_devices(
                self.options.devices,
                memory_fraction=self.options.device_memory_fraction,
                memory_bytes=self.options.device_memory_bytes,
            )
            from .costmodel import TopologyError
            from .eviction import CostAwarePolicy, LRUPolicy
            from .links import build_links, parse_bandwidth_spec
            from .placer import Placer

            try:
                links_spec = (parse_bandwidth_spec(self.options.device_bandwidths)
                              if self.options.device_bandwidths else None)
            except TopologyError as e:
                raise RuntimeError(str(e)) from None
            eviction = LRUPolicy() if self.options.scheduler == "lru-swap" else CostAwarePolicy()
            # Arenas are reserved and first-touched here, once, off the loop; links measured too.
            try:
                self.devices = await asyncio.to_thread(lambda: DevicePool(open_devices(spec), policy=eviction,
                                                                          lookahead=self.options.stage_lookahead))
                links = await asyncio.to_thread(build_links, self.devices.devices, links_spec)
                for m in self.devices.memories:
                    self.devices.set_host_bandwidth(m.device, links.bandwidth(f"pcie:{m.device.name}"))
                self.placer = Placer(self.devices, links, policy=self.options.scheduler)
            except TopologyError as e:
                raise RuntimeError(str(e)) from None
            except (RuntimeError, ValueError, MemoryError) as e:
                text = str(e)
                hint = ""
                if isinstance(e, MemoryError) or "memory" in text.lower() and "allocat" in text.lower():
                    hint = (" (another process may hold the memory: lower --device-memory-fraction "
                            "or set --device-memory-bytes)")
                raise RuntimeError(f"--devices {self.options.devices!r}: {text}{hint}") from None
        self._lifecycle_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        mode = self.options.model_control_mode
        sources, duplicates = self.repository.scan()
        for name in duplicates:
            self.models[name] = ModelEntry(name, error="model appears in two or more repositories")
        for name, src in sources.items():
            self.models.setdefault(name, ModelEntry(name, source=src))
        if mode in ("none", "poll"):
            to_load = list(sources)
        else:
            to_load = list(sources) if "*" in self.options.load_models else list(self.options.load_models)
        for name in to_load:
            try:
                await self.load(name, _internal=True)
            except TorporError as e:
                log.error("%s", e.message)
        self.live = True
        if mode == "poll" and self.options.repository_poll_secs > 0:
            self._poll_task = asyncio.create_task(self._poll_loop())

    async def drain(self, timeout: float) -> bool:
        """Stop taking new requests and wait (bounded) for in-flight ones; True if all finished."""
        self.exiting = True
        if self._idle is None or self.inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        self.exiting = True
        if self._poll_task:
            self._poll_task.cancel()
        for entry in list(self.models.values()):
            for v in entry.versions.values():
                if v.function is not None:
                    try:
                        await asyncio.get_running_loop().run_in_executor(self.workers, v.function.unload)
                    except Exception:
                        log.exception("unloading %s failed", entry.name)
                    v.function = None
            self._drop_override(entry)
        self.shm.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.devices is not None:
            self.devices.close()

    # ---------------------------------------------------------------------------------------
    # health and metadata
    # ---------------------------------------------------------------------------------------
    def server_metadata(self) -> dict:
        return {"name": self.options.server_id, "version": TRITON_VERSION, "extensions": EXTENSIONS}

    def is_live(self) -> bool:
        return self.live and not self.exiting

    def is_ready(self) -> bool:
        if not self.live or self.exiting:
            return False
        if not self.options.strict_readiness:
            return True
        for entry in self.models.values():
            if entry.error and entry.error != "unloaded":
                return False
            for v in entry.versions.values():
                if v.state == "READY" or (v.state == "UNAVAILABLE" and v.reason == "unloaded"):
                    continue
                return False
        return True

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
            return True
        except TorporError:
            return False

    def resolve(self, name: str, version: str = "") -> tuple[ModelEntry, VersionEntry]:
        """The READY version a request names (latest READY when `version` is empty)."""
        entry = self.models.get(name)
        if entry is None or entry.config is None:
            raise _unknown(name, f"'{name}' is not found")
        if version in ("", "-1", None):
            if len(entry.versions) == 1:  # the common case, without sorting
                for ve in entry.versions.values():
                    if ve.state == "READY":
                        return entry, ve
            ready = entry.ready_versions()
            if not ready:
                raise _unknown(name, f"'{name}' has no available versions")
            return entry, entry.versions[ready[-1]]
        try:
            v = int(version)
        except ValueError:
            raise _unknown(name, f"'{name}' version {version} is not found") from None
        ve = entry.versions.get(v)
        if ve is None:
            raise _unknown(name, f"'{name}' version {v} is not found")
        if ve.state != "READY":
            raise TorporError(
                Status.UNAVAILABLE,
                f"Request for unknown model: '{name}' version {v} is not at ready state",
            )
        return entry, ve

    def model_metadata(self, name: str, version: str = "") -> dict:
        entry, ve = self.resolve(name, version)
        versions = [str(ve.version)] if version not in ("", "-1") else [str(v) for v in entry.ready_versions()]
        config = entry.config
        return {
            "name": name,
            "versions": versions,
            "platform": config.platform or config.backend,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": self._meta_shape(entry, s)} for s in entry.inputs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": self._meta_shape(entry, s)} for s in entry.outputs],
        }

    @staticmethod
    def _meta_shape(entry: ModelEntry, spec: TensorSpec) -> list[int]:
        dims = list(spec.reshape if spec.reshape is not None else spec.dims)
        return ([-1] + dims) if entry.max_batch_size > 0 else dims

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        entry, _ = self.resolve(name, version)
        return entry.config

    def model_config_dict(self, name: str, version: str = "") -> dict:
        return config_to_dict(self.model_config(name, version))

    # ---------------------------------------------------------------------------------------
    # repository: index, load, unload, poll
    # ---------------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict]:
        sources, duplicates = self.repository.scan()
        names = sorted(set(sources) | set(self.models) | duplicates)
        out: list[dict] = []
        for name in names:
            entry = self.models.get(name)
            if name in duplicates:
                if not ready_only:
                    out.append({"name": name, "state": "UNAVAILABLE", "reason": "model appears in two or more repositories"})
                continue
            if entry is None or (not entry.versions and not entry.error):
                if not ready_only:
                    out.append({"name": name})
                continue
            if entry.error and not entry.versions:
                if not ready_only:
                    out.append({"name": name, "state": "UNAVAILABLE", "reason": entry.error})
                continue
            for v, ve in sorted(entry.versions.items()):
                if ready_only and ve.state != "READY":
                    continue
                item = {"name": name, "version": str(v), "state": ve.state}
                if ve.reason:
                    item["reason"] = ve.reason
                out.append(item)
        return out

    def _check_explicit(self) -> None:
        if self.options.model_control_mode != "explicit":
            raise unavailable("explicit model load / unload is not allowed if polling is enabled")

    async def load(
        self,
        name: str,
        config_json: str | None = None,
        files: dict[str, bytes] | None = None,
        _internal: bool = False,
    ) -> None:
        """Load (or reload) a model. `files` maps `<version>/<path>` to contents (the
        `file:` load parameters); they require `config_json`, as in Triton."""
        if not _internal:
            self._check_explicit()
        assert self._lifecycle_lock is not None
        async with self._lifecycle_lock:
            await self._load_locked(name, config_json, files or {})

    async def _load_locked(self, name: str, config_json: str | None, files: dict[str, bytes]) -> None:
        if files and config_json is None:
            raise invalid_arg(f"failed to load '{name}', failed to poll from model repository: model config must be provided when loading files")
        sources, duplicates = self.repository.scan()
        if name in duplicates:
            raise internal(f"failed to load '{name}', model appears in two or more repositories")
        entry = self.models.get(name) or ModelEntry(name)
        src = sources.get(name)
        override_dir = None
        if files:
            self._refuse_override_code(name, files)
            override_dir = self._write_override(name, files)
            model_dir = override_dir
        elif src is not None:
            model_dir = src.path
        else:
            raise internal(f"failed to load '{name}', failed to poll from model repository")
        try:
            if config_json is not None:
                config = parse_config_json(config_json, name)
                if not self.options.strict_model_config and (model_dir / "config.pbtxt").exists():
                    config = self._complete_config(config, read_config(model_dir))
            else:
                config = read_config(model_dir)
            if config.name and config.name != name:
                raise invalid_arg(f"model name in config '{config.name}' does not match the folder '{name}'")
            try:
                slo_seconds({"torpor.slo_ms": parameter(config, "torpor.slo_ms") or ""}, None)
            except ValueError as e:
                raise invalid_arg(str(e)) from None
            config.name = name
            versions = select_versions(config, available_versions(model_dir))
        except TorporError as e:
            if override_dir is not None:
                shutil.rmtree(override_dir, ignore_errors=True)
            if not entry.versions:
                entry.error = f"failed to load '{name}', {e.message}"
                entry.source = src
                self.models[name] = entry
            raise internal(f"failed to load '{name}', {e.message}") from None
        if config_json is not None:
            try:
                self._confine_config(name, config, config_json, model_dir, bool(files))
            except TorporError:
                if override_dir is not None:
                    shutil.rmtree(override_dir, ignore_errors=True)
                raise

        # Load the new versions before retiring the old ones, so a failed reload keeps serving.
        started = time.monotonic()
        new_versions: dict[int, VersionEntry] = {}
        errors = []
        loop = asyncio.get_running_loop()
        for v in versions:
            ve = VersionEntry(v, state="LOADING")
            try:
                fn = self.factory(name, v, config, model_dir / str(v), model_dir)
                await loop.run_in_executor(self.workers, fn.load)
            except Exception as e:  # noqa: BLE001 - any adapter failure is a load failure
                msg = e.message if isinstance(e, TorporError) else f"{type(e).__name__}: {e}"
                ve.state, ve.reason = "UNAVAILABLE", msg
                errors.append(f"version {v}: {msg}")
                log.error("failed to load '%s' version %d: %s", name, v, msg)
            else:
                groups = fn.layer_groups() if self.devices is not None and fn.placeable else []
                if groups:
                    key = (name, v)
                    try:
                        # weights into the host store (pinned when CUDA is present); no device touched
                        await loop.run_in_executor(self.workers, self.devices.register, key, groups, fn.module)
                    except Exception as e:  # noqa: BLE001
                        msg = f"{type(e).__name__}: {e}"
                        ve.state, ve.reason = "UNAVAILABLE", msg
                        errors.append(f"version {v}: {msg}")
                        new_versions[v] = ve
                        await loop.run_in_executor(self.workers, fn.unload)
                        continue
                    ve.pool_key = key
                    await self._profile(key, fn, config)
                ve.function = fn
                ve.state = "READY"
                ve.stats = ModelStats(name, str(v))
                ve.stats.load_duration_s = time.monotonic() - started
                ve.capacity = self._slot_count(ve, config)
                ve.slots = asyncio.Semaphore(ve.capacity)
            new_versions[v] = ve

        if errors and not any(ve.state == "READY" for ve in new_versions.values()):
            if override_dir is not None:
                shutil.rmtree(override_dir, ignore_errors=True)
            old_ready = [ve for ve in entry.versions.values() if ve.state == "READY"]
            if not old_ready:
                entry.set_config(config)
                entry.versions = new_versions
                entry.source = src
                entry.error = ""
                self.models[name] = entry
            raise internal(f"failed to load '{name}', " + "; ".join(errors))

        # A python model's auto_complete_config may have filled in its config during load.
        loaded = [ve.function for ve in new_versions.values() if ve.function is not None]
        if loaded:
            config = loaded[-1].config
        old = entry.versions
        old_override = entry.override_dir
        entry.set_config(config)
        entry.versions = new_versions
        entry.source = src
        entry.error = ""
        entry.override_dir = override_dir
        entry.labels = self._read_labels(model_dir, entry.outputs)
        entry.mtime = self._mtime(model_dir)
        entry.active_sequences = set()
        self.models[name] = entry
        await self._retire(old.values())
        if old_override is not None and old_override != override_dir:
            shutil.rmtree(old_override, ignore_errors=True)

    async def _retire(self, versions) -> None:
        loop = asyncio.get_running_loop()
        for ve in versions:
            if ve.function is None:
                continue
            # Let in-flight executions finish before unloading: take every slot.
            if ve.slots is not None:
                for _ in range(self._slot_count(ve, ve.function.config)):
                    await ve.slots.acquire()
            fn, ve.function = ve.function, None
            if ve.pool_key is not None and self.devices is not None:
                try:
                    await self.devices.unregister(ve.pool_key)
                    if self.placer is not None:
                        self.placer.forget(ve.pool_key)
                except Exception:
                    log.exception("dropping %s version %d from the devices failed", fn.name, ve.version)
                ve.pool_key = None
            try:
                await loop.run_in_executor(self.workers, fn.unload)
            except Exception:
                log.exception("unloading %s version %d failed", fn.name, ve.version)

    async def unload(self, name: str, unload_dependents: bool = False, _internal: bool = False) -> None:
        if not _internal:
            self._check_explicit()
        assert self._lifecycle_lock is not None
        async with self._lifecycle_lock:
            entry = self.models.get(name)
            if entry is None:
                return  # Triton answers an unload of an unknown or never-loaded model with success
            for ve in entry.versions.values():
                if ve.state == "READY":
                    ve.state = "UNLOADING"
            await self._retire(entry.versions.values())
            for ve in entry.versions.values():
                ve.state, ve.reason = "UNAVAILABLE", "unloaded"
            self._drop_override(entry)

    def _drop_override(self, entry: ModelEntry) -> None:
        if entry.override_dir is not None:
            shutil.rmtree(entry.override_dir, ignore_errors=True)
            entry.override_dir = None

    def _refuse_override_code(self, name: str, files: dict[str, bytes]) -> None:
        if self.options.allow_override_code:
            return
        for rel in files:
            if rel.lower().endswith(_CODE_SUFFIXES):
                raise invalid_arg(
                    f"failed to load '{name}', the load request carries code in 'file:{rel}'; this server refuses "
                    "code in file: overrides (start it with --allow-override-code=true to allow it)"
                )

    def _write_override(self, name: str, files: dict[str, bytes]) -> Path:
        for rel in files:
            if not _confined_path(rel):
                # the client's mistake (or an attack), not the server's: INVALID_ARG, and nothing written
                raise invalid_arg(
                    f"failed to load '{name}', invalid file path 'file:{rel}' in load override: it must be a "
                    "relative path inside the model's folder (no '..', no absolute path)"
                )
        root = Path(tempfile.mkdtemp(prefix=f"torpor-{name}-"))
        real_root = root.resolve()
        try:
            for rel, data in files.items():
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                # nothing in a fresh folder links out of it, but a later file may not write through
                # an earlier folder that resolves elsewhere either
                if not target.parent.resolve().is_relative_to(real_root):
                    raise invalid_arg(f"invalid file path 'file:{rel}' in load override: it leaves the model's folder")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        except (OSError, ValueError, TorporError) as e:
            shutil.rmtree(root, ignore_errors=True)
            msg = e.message if isinstance(e, TorporError) else str(e)
            raise internal(f"failed to load '{name}', failed to poll from model repository: {msg}") from None
        return root

    def _confine_config(self, name: str, config: ModelConfig, config_json: str, model_dir: Path,
                        with_files: bool) -> None:
        """A config that arrives through the load API may only name files inside the model's own
        folder, and (unless code is allowed) may not pick code to run: a python-backend model
        from `file:` contents, or a `torpor.module_class` the folder's own config does not name."""
        where = [("default_model_filename", config.default_model_filename)]
        where += [(f"label_filename of output '{o.name}'", o.label_filename) for o in config.output]
        module_class = parameter(config, "torpor.module_class") or ""
        if ".py:" in module_class:
            where.append(("torpor.module_class", module_class.rpartition(":")[0]))
        for what, rel in where:
            if rel and not _confined_path(rel, model_dir):
                raise invalid_arg(f"failed to load '{name}', {what} '{rel}' must name a file inside the model's folder")
        if self.options.allow_override_code:
            return
        if with_files and config.backend == "python":
            raise invalid_arg(
                f"failed to load '{name}', a python-backend model's code may not arrive in file: overrides "
                "(start the server with --allow-override-code=true to allow it)"
            )
        override = parse_config_json(config_json, name)
        wanted = parameter(override, "torpor.module_class")
        if wanted:
            on_disk = read_config(model_dir) if (model_dir / "config.pbtxt").exists() else None
            if on_disk is None or parameter(on_disk, "torpor.module_class") != wanted:
                raise invalid_arg(
                    f"failed to load '{name}', a load request may not choose the model's code "
                    "('torpor.module_class'); start the server with --allow-override-code=true to allow it"
                )

    @staticmethod
    def _complete_config(override: ModelConfig, on_disk: ModelConfig) -> ModelConfig:
        """Auto-complete a `config` load override, as Triton's backends do from the model file:
        fields the override sets replace the repository's; the rest (inputs, outputs, backend,
        ...) come from the model's own config.pbtxt."""
        merged = ModelConfig()
        merged.CopyFrom(on_disk)
        for field_desc, _ in override.ListFields():
            merged.ClearField(field_desc.name)
        merged.MergeFrom(override)
        return merged

    async def _profile(self, key: Any, fn: ModelFunction, config: ModelConfig) -> None:
        """A few runs on a device at load, on zero inputs of batch 1: the scheduler's first
        execution estimate, and the model's warm-up (first-run costs such as kernel selection
        are paid here, not by a user's request). Best effort: models with BYTES or variable-
        size inputs, or that fail on zeros, are left to be measured by real requests."""
        runs = self.options.profile_runs
        if runs <= 0 or self.placer is None:
            return
        inputs: dict[str, np.ndarray] = {}
        specs, _ = tensor_specs(config)
        for spec in specs:
            dims = spec.reshape if spec.reshape is not None else spec.dims
            if spec.optional:
                continue
            if spec.datatype == "BYTES" or any(d < 0 for d in dims):
                return
            shape = ((1,) if config.max_batch_size > 0 else ()) + tuple(dims)
            inputs[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
        mreq = ModelRequest(inputs, [])
        try:
            decision = self.placer.place(key, None, record=False)
            device = decision.option.device if decision is not None and decision.option is not None else None
            async with self.devices.acquire(key, device, timeout=30.0) as placement:
                if placement.outcome in ("host", "peer"):
                    self.placer.copy_started(placement.resident, decision, placement.outcome)
                await placement.ready()

                def work():
                    times = []
                    for _ in range(runs + 1):
                        t = time.perf_counter()
                        (out,) = fn.execute_on((placement.module, placement.device), [mreq])
                        if isinstance(out, Exception):
                            raise out
                        times.append(time.perf_counter() - t)
                    return times[1:]  # the first run is the warm-up

                times = await placement.run(work)
            self.placer.seed_exec(key, sorted(times)[len(times) // 2])
        except Exception as e:  # noqa: BLE001 - profiling is best effort
            log.debug("profiling %s at load skipped: %s", key, e)

    def _slot_count(self, ve: VersionEntry, config: ModelConfig) -> int:
        """Requests of a version in flight at once. Where loaded: one per model instance. On
        devices: the devices' workers run one request at a time each, and the scheduler must
        see requests queued per device to place, queue or batch them, so the slots only bound
        admission."""
        if ve.pool_key is not None and self.devices is not None:
            return _DEVICE_INFLIGHT * len(self.devices.memories)
        return self._instance_count(config)

    @staticmethod
    def _instance_count(config: ModelConfig) -> int:
        n = sum(max(1, g.count) for g in config.instance_group)
        return max(1, n)

    @staticmethod
    def _read_labels(model_dir: Path, outputs: list[TensorSpec]) -> dict[str, list[str]]:
        labels = {}
        for spec in outputs:
            if spec.label_filename:
                p = model_dir / spec.label_filename
                if p.exists():
                    labels[spec.name] = p.read_text().splitlines()
        return labels

    @staticmethod
    def _mtime(model_dir: Path) -> float:
        latest = 0.0
        for root, _, files in os.walk(model_dir):
            for f in files:
                try:
                    latest = max(latest, os.stat(os.path.join(root, f)).st_mtime)
                except OSError:
                    pass
        return latest

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """POLL mode: load new or changed models, unload removed ones."""
        sources, _ = self.repository.scan()
        for name, src in sources.items():
            entry = self.models.get(name)
            if entry is None or entry.mtime != self._mtime(src.path):
                try:
                    await self.load(name, _internal=True)
                except TorporError as e:
                    log.error("%s", e.message)
        for name in list(self.models):
            if name not in sources and self.models[name].versions:
                await self.unload(name, _internal=True)
                self.models.pop(name, None)

    # ---------------------------------------------------------------------------------------
    # statistics and residency
    # ---------------------------------------------------------------------------------------
    def residency(self) -> dict:
        """Per device: which models are resident, bytes used and free (GET /v2/torpor/residency)."""
        if self.devices is None:
            return {"devices": [], "note": "no devices configured (--devices): models run where loaded"}
        return self.devices.residency()

    def topology(self) -> dict:
        """The devices' links (measured or configured), the scheduler's state and per-model
        SLO accounting (GET /v2/torpor/topology)."""
        if self.placer is None:
            return {"devices": [], "links": [], "note": "no devices configured (--devices): models run where loaded"}
        return self.placer.describe()

    def swap_counters(self) -> dict:
        """Per (model, version): the swap engine's counters (swap-ins, bytes, hits, ...)."""
        return self.devices.counters() if self.devices is not None else {}

    def _memory_usage(self, ve: VersionEntry) -> list[dict]:
        """Triton's memory_usage entries: where this version's weights are resident now."""
        if self.devices is None or ve.pool_key is None:
            return []
        out = []
        for m in self.devices.memories:
            r = m.residents.get(ve.pool_key)
            if r is not None:
                out.append({"type": "GPU" if m.device.kind == "cuda" else "CPU", "id": m.device.index,
                            "byte_size": r.nbytes})
        return out

    def _stats_dict(self, name: str, ve: VersionEntry) -> dict:
        if ve.stats is None:
            return empty_stats(name, str(ve.version))
        ve.stats.memory_usage = self._memory_usage(ve)
        return ve.stats.to_dict()

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        if not name:
            return [
                self._stats_dict(n, ve)
                for n in sorted(self.models)
                for _, ve in sorted(self.models[n].versions.items())
                if ve.state == "READY"
            ]
        entry, ve = self.resolve(name, version)
        if version in ("", "-1"):
            return [self._stats_dict(name, e) for _, e in sorted(entry.versions.items()) if e.state == "READY"]
        return [self._stats_dict(name, ve)]

    # ---------------------------------------------------------------------------------------
    # inference
    # ---------------------------------------------------------------------------------------
    def _begin(self) -> None:
        if self.exiting:
            raise unavailable("Server is exiting, new requests are refused")
        self.inflight += 1
        if self._idle is not None:
            self._idle.clear()

    def _end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def infer(self, request: InferRequest) -> InferResponse:
        """One request, one response (non-decoupled models)."""
        self._begin()
        try:
            entry, ve = self.resolve(request.model_name, request.model_version)
            if entry.decoupled:
                raise unsupported(
                    "ModelInfer RPC doesn't support models with decoupled transaction policy"
                )
            stats = ve.stats
            self._admit(entry, ve)
            stats.pending += 1
            try:
                return await self._run(entry, ve, request)
            finally:
                stats.pending -= 1
        finally:
            self._end()

    async def infer_stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """0..n responses; the last has final=True. Non-decoupled models give exactly one.
        Per-request failures are raised (the stream front end turns them into error messages)."""
        self._begin()
        try:
            entry, ve = self.resolve(request.model_name, request.model_version)
            stats = ve.stats
            self._admit(entry, ve)
            stats.pending += 1
            try:
                if not entry.decoupled:
                    yield await self._run(entry, ve, request)
                    return
                async for resp in self._run_decoupled(entry, ve, request):
                    yield resp
            finally:
                stats.pending -= 1
        finally:
            self._end()

    def _prepare(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest) -> tuple[ModelRequest, int]:
        name = entry.name
        specs = entry.input_index
        controls = entry.controls
        inputs: dict[str, np.ndarray] = {}
        max_batch = entry.max_batch_size
        limit = self.options.max_tensor_elements
        batch = None
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
        if request.outputs:
            output_names = [o.name for o in request.outputs]
            for o in output_names:
                if o not in entry.output_index:
                    raise invalid_arg(f"unexpected inference output '{o}' for model '{name}'")
        else:
            output_names = [s.name for s in entry.outputs]
        return (
            ModelRequest(
                inputs=inputs,
                requested_outputs=output_names,
                parameters=custom,
                id=request.id,
                correlation_id=corr,
                flags=flags,
            ),
            batch,
        )

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
    def _admit(self, entry: ModelEntry, ve: VersionEntry) -> None:
        """Refuse a request the model's queue has no room for, so a burst or a stuck model costs
        a bounded number of waiting requests, not unbounded memory."""
        limit = entry.max_queue_size if entry.max_queue_size > 0 else self.options.max_queue_size
        if limit > 0 and ve.stats.pending >= ve.capacity + limit:
            ve.stats.record_failure(0, "REJECTED")
            raise unavailable(f"Exceeds maximum queue size: model '{entry.name}' has {ve.stats.pending} requests "
                              f"in flight, {limit} may wait for its {ve.capacity} instance(s)")

    async def _run(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest) -> InferResponse:
        stats = ve.stats
        t0 = request.arrival_ns
        try:
            mreq, batch = self._prepare(entry, ve, request)
            deadline = _deadline(request)
            if deadline is None or not ve.slots.locked():
                await ve.slots.acquire()
            else:
                await _acquire_slot_by(ve.slots, deadline)
            held = True
            try:
                t_start = time.monotonic_ns()
                executions = 1
                if ve.pool_key is not None:
                    result, t_exec_start, executions = await self._run_on_device(entry, ve, mreq, request, batch)
                    t_done = time.monotonic_ns()
                else:
                    fn = ve.function
                    if ve.gate.inline and not fn.blocking:
                        result, t_exec_start, cpu_ns, blocked = _timed_execute_inline(fn, mreq)
                        wall_ns = None  # what the loop lost: measured below
                    else:
                        fut = asyncio.get_running_loop().run_in_executor(self.workers, _timed_execute, fn, mreq)
                        # The instance stays taken until its thread returns, even when this request
                        # stops waiting (timeout, client gone): a thread cannot be stopped.
                        held = False
                        fut.add_done_callback(lambda _f, slots=ve.slots: slots.release())
                        result, t_exec_start, cpu_ns, wall_ns = await _wait_until(fut, deadline)
                        blocked = False
                    t_done = time.monotonic_ns()
                    if wall_ns is None:
                        wall_ns = t_done - t_exec_start
                    self._gate(entry, ve, cpu_ns, wall_ns, blocked)
            finally:
                if held:
                    ve.slots.release()
            if isinstance(result, Exception):
                raise result
            response = self._build_response(entry, ve, request, result, batch)
            t_end = time.monotonic_ns()
        except TorporError as e:
            refused = e.status in (Status.INVALID_ARG, Status.UNAVAILABLE)
            stats.record_failure(time.monotonic_ns() - t0, "REJECTED" if refused else "BACKEND")
            raise
        except asyncio.CancelledError:  # the client went away (HTTP disconnect, gRPC cancel or deadline)
            stats.record_failure(time.monotonic_ns() - t0, "CANCELED")
            raise
        except Exception as e:  # noqa: BLE001 - a model's own failure is the request's failure
            stats.record_failure(time.monotonic_ns() - t0, "BACKEND")
            raise internal(f"{type(e).__name__}: {e}") from None
        stats.record_success(
            batch,
            request_ns=t_end - t0,
            queue_ns=t_start - t0,
            input_ns=t_exec_start - t_start,
            infer_ns=t_done - t_exec_start,
            output_ns=t_end - t_done,
            executions=executions,
        )
        return response

    @staticmethod
    def _gate(entry: ModelEntry, ve: VersionEntry, cpu_ns: int, wall_ns: int, blocked: bool = False) -> None:
        was = ve.gate.inline
        ve.gate.record(cpu_ns, wall_ns, blocked)
        if ve.gate.inline != was:
            log.debug("model '%s' version %d now runs %s", entry.name, ve.version,
                      "inline on the event loop" if ve.gate.inline else "on worker threads")

    def _slo(self, entry: ModelEntry, request: InferRequest) -> float | None:
        """Seconds: the model's `torpor.slo_ms`, else `--default-slo-ms`, tightened by the
        request's `timeout` parameter."""
        default = entry.slo_ms if entry.slo_ms is not None else self.options.default_slo_ms
        return slo_seconds(None, default, _timeout_seconds(request))

    async def _run_on_device(self, entry: ModelEntry, ve: VersionEntry, mreq: ModelRequest,
                             request: InferRequest, batch: int):
        """Late binding: the scheduler picks the device and the copy's source (torpor.placer);
        pin the model there (resident, or swapped in with the copy pipelined under this very
        execution), run, unpin. (result, execution start ns, executions: 0 when it rode in
        another request's batch)"""
        key, placer = ve.pool_key, self.placer
        slo = self._slo(entry, request)
        arrival = request.arrival_ns / 1e9  # the monotonic clock, as the placer's
        decision = placer.place(key, slo, batch, arrival)
        if self.options.shed_late and shed_at_arrival(decision):
            placer.shed(key, "arrival", reason="late")
            raise unavailable(
                f"Exceeds maximum queue size: model '{entry.name}' would answer "
                f"{(decision.waited_s + decision.option.completion_s) * 1e3:.0f} ms after arrival at the earliest, "
                f"past its {slo * 1e3:.0f} ms objective (request shed; the server is overloaded)")
        device, source = None, "auto"
        if decision is not None and decision.option is not None:
            o = decision.option
            device = o.device
            source = "host" if o.action == "swap" else (o.source if o.action == "peer" else "auto")
            if self.options.shed_late and slo is not None and o.action in ("swap", "peer") \
                    and self.devices.stages[device].would_defer(key):
                # its copy would evict a model that waiting requests want, so it would wait for
                # them (torpor.staging); if they outlast its slack it would be shed then: now
                slack = arrival + slo - time.monotonic() - o.exec_s - placer.copy_seconds(key, device)
                if outlasted(placer.backlog(device), slack):
                    placer.shed(key, "arrival", reason="harms")
                    raise unavailable(
                        f"Exceeds maximum queue size: model '{entry.name}' would have to evict a model that "
                        f"waiting requests need, and they outlast its {slo * 1e3:.0f} ms objective "
                        f"(request shed; the server is overloaded)")
            if o.action in ("swap", "peer"):
                # Start the copy now where that evicts nothing a waiting request wants: the
                # request may wait several turns for its stage, and its model lands meanwhile.
                early = self.devices.start_copy(key, device, source)
                if early is not None:
                    placer.copy_started(early.resident, decision, early.outcome)
        ticket = placer.admit(key, decision, batch, slo, arrival)
        executions = 1
        try:
            if device is not None and entry.batching is not None:
                open_batch = self._batches.get((key, device))
                if open_batch is not None and open_batch.join(mreq, batch):
                    # Rides with requests already queued for that device: one execution for all.
                    ticket.ride()
                    res, t_exec_start = await open_batch.result(mreq)
                    executions = 0
                else:
                    res, t_exec_start = await self._run_batch(entry, ve, key, device, source, decision, mreq, batch,
                                                              request, ticket)
            else:
                res, t_exec_start = await self._run_batch(entry, ve, key, device, source, decision, mreq, batch,
                                                          request, ticket, batching=False)
        finally:
            ticket.done()
        placer.observe_latency(key, (time.monotonic_ns() - request.arrival_ns) / 1e9, slo,
                               ticket if executions else None)
        return res, t_exec_start, executions

    async def _run_batch(self, entry: ModelEntry, ve: VersionEntry, key: Any, device: str | None, source: str,
                         decision: Any, mreq: ModelRequest, batch: int, request: InferRequest, ticket: Any,
                         batching: bool = True):
        """Acquire the model on `device` and execute `mreq`, with whatever requests of the same
        model join it (`_DeviceBatch`) until the device's worker starts it."""
        placer = self.placer
        group = _DeviceBatch(entry.max_batch_size, mreq, batch)
        if batching:
            self._batches[(key, device)] = group
        fn = ve.function
        try:
            delay = entry.batching or 0.0
            if batching and delay > 0:
                # dynamic_batching.max_queue_delay_microseconds: hold the batch open that long
                # for others to join, unless it fills first
                await group.wait_full(delay)
            deadline = _deadline(request)
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise unavailable("Request timeout expired: the request's timeout passed before it reached a device")

            copy_s = placer.copy_seconds(key, device) if device is not None else 0.0
            shed = self.options.shed_late and ticket.due < math.inf

            def on_stage(stage: Any, resident: bool) -> None:
                # its turn on the device: a last look before it takes memory or starts a copy
                if not shed:
                    return
                why = shed_when_staged(time.monotonic(), ticket.estimate, copy_s, resident, ticket.due, stage.level,
                                       lambda: placer.would_delay(ticket, copy_s))
                if why is not None:
                    placer.shed(key, "queued", len(group.members), reason=why)
                    what = {"late": "would finish past",
                            "harms": "could only run by evicting a model other requests are waiting for, within",
                            "stalls": "could only run by stalling requests queued before their objectives, within"}
                    raise unavailable(
                        f"Exceeds maximum queue size: model '{entry.name}' request {what[why]} its "
                        f"{(ticket.due - request.arrival_ns / 1e9) * 1e3:.0f} ms objective when its turn came on "
                        f"{ticket.device} (request shed; the server is overloaded)")

            # with an objective, it may wait (holding nothing) while its copy would evict a model
            # that others wait for, as long as it could still start its copy and be on time
            defer_until = defer_deadline(ticket.due, ticket.estimate, copy_s) if shed else 0.0
            async with self.devices.acquire(key, device, timeout=timeout, source=source, order=ticket.key,
                                            on_stage=on_stage, defer_until=defer_until, tag=ticket) as placement:
                placer.staged(ticket, placement)
                t_exec_start = time.monotonic_ns()

                def work():
                    ticket.started()
                    members, size = group.close()
                    t = time.perf_counter()
                    # execute_on runs in the device's worker, compute stream current, group waits armed
                    out = fn.execute_on((placement.module, placement.device), members)
                    return members, size, out, time.perf_counter() - t

                # queued on the device in the scheduler's order (its deadline, torpor.placer)
                members, size, outs, seconds = await placement.run_ordered(ticket.key, work)
                if placement.outcome == "hit":
                    placer.observe_exec(key, seconds, size)
        except BaseException as e:
            group.fail(e)
            raise
        finally:
            if self._batches.get((key, device)) is group:
                del self._batches[(key, device)]
        group.deliver(members, outs, t_exec_start)
        return outs[0], t_exec_start

    async def _run_decoupled(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest) -> AsyncIterator[InferResponse]:
        stats = ve.stats
        t0 = request.arrival_ns
        try:
            mreq, batch = self._prepare(entry, ve, request)
        except TorporError:
            stats.record_failure(time.monotonic_ns() - t0, "REJECTED")
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(outputs, error, final):
            loop.call_soon_threadsafe(queue.put_nowait, (outputs, error, final))

        def work():
            try:
                ve.function.execute_decoupled(mreq, emit)
            except Exception as e:  # noqa: BLE001
                emit(None, e, True)

        async with ve.slots:
            t_start = time.monotonic_ns()
            fut = loop.run_in_executor(self.workers, work)
            failed = False
            try:
                while True:
                    outputs, error, final = await queue.get()
                    if error is not None:
                        failed = True
                        err = error if isinstance(error, TorporError) else internal(str(error))
                        yield InferResponse(entry.name, str(ve.version), request.id, final=final, error=err)
                    else:
                        resp = (
                            self._build_response(entry, ve, request, outputs, batch)
                            if outputs is not None
                            else InferResponse(entry.name, str(ve.version), request.id)
                        )
                        resp.final = final
                        yield resp
                    if final:
                        break
            finally:
                await fut
        t_end = time.monotonic_ns()
        if failed:
            stats.record_failure(t_end - t0, "BACKEND")
        else:
            stats.record_success(batch, t_end - t0, t_start - t0, 0, t_end - t_start, 0)

    def _build_response(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest, result: dict, batch: int) -> InferResponse:
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


def _timed_execute_inline(fn: ModelFunction, mreq: ModelRequest) -> tuple[Any, int, int, bool]:
    """On the loop: (result, start ns, thread CPU ns, whether the model gave up the CPU by
    itself: a voluntary context switch, as a sleep, I/O or lock wait makes; see InlineGate).
    The closing readings are taken only for a run slow enough to matter, the common case pays
    two clock reads and one getrusage (~2 us). getrusage's CPU times are tick-sampled (4 ms
    here), so CPU comes from the thread clock and only the switch count from getrusage."""
    t_in = time.monotonic_ns()
    cpu0 = time.thread_time_ns()
    ru0 = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    (res,) = fn.execute([mreq])
    wall = time.monotonic_ns() - t_in
    if wall <= InlineGate.BAILOUT_NS:
        return res, t_in, wall, False
    cpu = time.thread_time_ns() - cpu0
    return res, t_in, cpu, resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw > ru0


def _timed_execute(fn: ModelFunction, mreq: ModelRequest) -> tuple[Any, int, int, int]:
    """On a worker thread: (result, start ns, thread CPU ns, wall ns within the thread). CPU
    time judges the cost of a threaded run (its wall time includes waiting for the GIL); the
    in-thread wall time, whether it waits on something (InlineGate)."""
    t_in = time.monotonic_ns()
    cpu = time.thread_time_ns()
    (res,) = fn.execute([mreq])
    return res, t_in, time.thread_time_ns() - cpu, time.monotonic_ns() - t_in


_DEVICE_INFLIGHT = 64  # per device, per model version


class _DeviceBatch:
    """Requests of one model queued for one device, executed together (dynamic batching).

    Opened by the request that goes to the device; others the scheduler sends to the same
    device join it while it is open and the batch has room (`max_batch_size`). It closes when
    the device's worker starts executing it (`close()`, on that worker thread, hence the
    lock); each member's result is handed back on the loop (`deliver`)."""

    __slots__ = ("_closed", "_full", "_futures", "_lock", "max_batch", "members", "size")

    def __init__(self, max_batch: int, first: ModelRequest, batch: int):
        self.max_batch = max_batch
        self.members = [first]
        self.size = batch
        self._closed = False
        self._lock = threading.Lock()
        self._futures: dict[int, asyncio.Future] = {}
        self._full: asyncio.Event | None = None

    def join(self, mreq: ModelRequest, batch: int) -> bool:
        with self._lock:
            if self._closed or self.size + batch > self.max_batch:
                return False
            self.members.append(mreq)
            self.size += batch
            self._futures[id(mreq)] = asyncio.get_running_loop().create_future()
            full = self.size >= self.max_batch
        if full and self._full is not None:
            self._full.set()
        return True

    async def wait_full(self, delay: float) -> None:
        self._full = asyncio.Event()
        if self.size < self.max_batch:
            try:
                await asyncio.wait_for(self._full.wait(), delay)
            except TimeoutError:
                pass

    def close(self) -> tuple[list[ModelRequest], int]:
        with self._lock:
            self._closed = True
            return list(self.members), self.size

    async def result(self, mreq: ModelRequest):
        return await self._futures[id(mreq)]

    def deliver(self, members: list[ModelRequest], outs: list, t_exec_start: int) -> None:
        for m, out in zip(members, outs, strict=True):
            f = self._futures.get(id(m))
            if f is not None and not f.done():
                f.set_result((out, t_exec_start))

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._closed = True
        for f in self._futures.values():
            if not f.done():
                f.set_exception(error if isinstance(error, Exception) else internal("request cancelled"))


_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyz", ".so", ".pth")


def _confined_path(rel: str, folder: Path | None = None) -> bool:
    """`rel` is a relative path that stays inside `folder` (lexically; and, where it exists,
    after resolving symlinks)."""
    if not rel or "\0" in rel:
        return False
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return False
    if folder is None:
        return True
    try:
        return (folder / p).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError):
        return False


def _deadline(request: InferRequest) -> float | None:
    """time.monotonic() by which the request's `timeout` parameter wants an answer."""
    t = _timeout_seconds(request)
    return None if t is None else request.arrival_ns / 1e9 + t


async def _acquire_slot_by(slots: asyncio.Semaphore, deadline: float) -> None:
    """Wait for a busy instance no later than `deadline` (the caller takes a free one, or waits
    without a deadline, itself: the common case, without this frame)."""
    waiter = asyncio.ensure_future(slots.acquire())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:
        _abandon(waiter, slots)
        raise
    if not done:
        _abandon(waiter, slots)
        raise unavailable("Request timeout expired: no model instance became free within the request's timeout")


def _abandon(waiter: asyncio.Future, slots: asyncio.Semaphore) -> None:
    # a permit the abandoned wait obtained after all goes straight back
    waiter.add_done_callback(lambda f: None if f.cancelled() or f.exception() else slots.release())
    waiter.cancel()


async def _wait_until(fut: asyncio.Future, deadline: float | None):
    """The worker thread's result; shielded, so neither a timeout nor a cancelled request
    cancels the future whose completion frees the model instance."""
    if deadline is None:
        return await asyncio.shield(fut)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise unavailable("Request timeout expired: the model did not answer within the request's timeout") from None


def _timeout_seconds(request: InferRequest) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton) in seconds."""
    t = request.parameters.get("timeout")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0:
        return t / 1e6
    return None


def _as_bytes_array(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1)):
        flat[i] = v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else str(v).encode())
    return out
