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
import os
import resource
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.config import (
    ModelConfig,
    config_to_dict,
    parameter,
    parse_config_json,
    read_config,
)
from torpor.dataplane.request_rules import RequestRules
from torpor.dataplane.shm import SharedMemoryManager
from torpor.dataplane.timeouts import acquire_slot_by, request_deadline, timeout_seconds, wait_until
from torpor.errors import Status, TorporError, internal, invalid_arg, unavailable, unsupported
from torpor.model import ModelFunction, ModelRequest, TensorSpec
from torpor.registry.model_entry import InlineGate, ModelEntry, VersionEntry
from torpor.registry.overrides import (
    complete_config,
    confine_config,
    drop_override,
    refuse_override_code,
    write_override,
)
from torpor.registry.repository import (
    Repository,
    available_versions,
    folder_mtime,
    read_labels,
    select_versions,
)
from torpor.runtime.device_path import DeviceJob
from torpor.scheduling.costmodel import slo_seconds
from torpor.settings import LogSettings, TraceSettings
from torpor.stats import ModelStats, empty_stats
from torpor.tensors import InferRequest, InferResponse

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
    # "cpu:2" bind weighted models to those devices late, per request (torpor.runtime.residency).
    devices: str = ""
    device_memory_fraction: float | None = None
    device_memory_bytes: str | None = None
    # The scheduler (torpor.runtime.placer): its policy, the links it plans with (a topology file or
    # short form, torpor.runtime.links; None: measured at start), and the latency objective of models
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
    stage_lookahead: int = 1  # requests per device holding memory beyond those running (torpor.runtime.staging)


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
        self.rules = RequestRules(options, self.shm)  # validation and responses (torpor.dataplane.request_rules)
        self.trace = TraceSettings()
        self.logging = LogSettings()
        workers = options.worker_threads or min(32, (os.cpu_count() or 1) + 4)
        self.workers = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="torpor-exec")
        # torpor.runtime.device_path.DeviceRuntime when --devices names any (the swap engine), with its
        # DevicePool (`devices`) and the scheduler's seam to it (`placer`)
        self.runtime = None
        self.devices = None
        self.placer = None
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
            # Imported here: the swap engine (devices, residency) needs torch, the rest of the engine does not.
            from torpor.runtime.device_path import DeviceRuntime

            self.runtime = await DeviceRuntime.open(self.options)
            self.devices, self.placer = self.runtime.pool, self.runtime.placer
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
            drop_override(entry)
        self.shm.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.runtime is not None:
            self.runtime.close()

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
            refuse_override_code(name, files, self.options.allow_override_code)
            override_dir = write_override(name, files)
            model_dir = override_dir
        elif src is not None:
            model_dir = src.path
        else:
            raise internal(f"failed to load '{name}', failed to poll from model repository")
        try:
            if config_json is not None:
                config = parse_config_json(config_json, name)
                if not self.options.strict_model_config and (model_dir / "config.pbtxt").exists():
                    config = complete_config(config, read_config(model_dir))
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
                confine_config(name, config, config_json, model_dir, bool(files), self.options.allow_override_code)
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
                    await self.runtime.profile(key, fn, config, self.options.profile_runs)
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
        entry.labels = read_labels(model_dir, entry.outputs)
        entry.mtime = folder_mtime(model_dir)
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
            drop_override(entry)

    def _slot_count(self, ve: VersionEntry, config: ModelConfig) -> int:
        """Requests of a version in flight at once. Where loaded: one per model instance. On
        devices: the devices' workers run one request at a time each, and the scheduler must
        see requests queued per device to place, queue or batch them, so the slots only bound
        admission."""
        if ve.pool_key is not None and self.runtime is not None:
            return self.runtime.slots()
        return self._instance_count(config)

    @staticmethod
    def _instance_count(config: ModelConfig) -> int:
        n = sum(max(1, g.count) for g in config.instance_group)
        return max(1, n)

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
            if entry is None or entry.mtime != folder_mtime(src.path):
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
            mreq, batch = self.rules.prepare(entry, ve, request)
            deadline = request_deadline(request)
            if deadline is None or not ve.slots.locked():
                await ve.slots.acquire()
            else:
                await acquire_slot_by(ve.slots, deadline)
            held = True
            try:
                t_start = time.monotonic_ns()
                executions = 1
                if ve.pool_key is not None:
                    job = DeviceJob(ve.pool_key, entry.name, ve.function, mreq, batch, request.arrival_ns,
                                    request_deadline(request), self._slo(entry, request), entry.max_batch_size,
                                    entry.batching)
                    result, t_exec_start, executions = await self.runtime.run(job)
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
                        result, t_exec_start, cpu_ns, wall_ns = await wait_until(fut, deadline)
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
            response = self.rules.build_response(entry, ve, request, result, batch)
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
        return slo_seconds(None, default, timeout_seconds(request))

    async def _run_decoupled(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest) -> AsyncIterator[InferResponse]:
        stats = ve.stats
        t0 = request.arrival_ns
        try:
            mreq, batch = self.rules.prepare(entry, ve, request)
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
                            self.rules.build_response(entry, ve, request, outputs, batch)
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
