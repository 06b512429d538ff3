"""The Engine: the one seam between the protocol front ends and the models.

Front ends decode a request into `InferRequest`, call `Engine.infer` (or `infer_stream` for
decoupled models) and encode the `InferResponse`. The engine resolves the model version,
validates inputs against the config, fills sequence-control tensors, runs the model function on
a worker thread (never blocking the event loop), selects and post-processes outputs
(classification, shared memory) and keeps Triton-shaped statistics. Front ends call its methods
only, never its fields. The models themselves and their lifecycle (load, unload, poll, the
repository index) are the registry's (`torpor.registry.lifecycle.ModelRegistry`); the devices
are the device runtime's (`torpor.runtime.device_path.DeviceRuntime`, when --devices names any).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torpor.config import (
    ModelConfig,
    config_to_dict,
)
from torpor.dataplane.cluster import PeerTable, ReportEpoch, residency_report
from torpor.dataplane.host_batching import HostBatcher
from torpor.dataplane.request_rules import RequestRules
from torpor.dataplane.shm import SharedMemoryManager
from torpor.dataplane.timeouts import acquire_slot_by, request_deadline, timeout_seconds, wait_until
from torpor.errors import Status, TorporError, internal, unavailable, unsupported
from torpor.model import ModelFunction, ModelRequest, TensorSpec
from torpor.registry.lifecycle import Factory, ModelRegistry
from torpor.registry.model_entry import InlineGate, ModelEntry, VersionEntry
from torpor.runtime.device_path import DeviceJob
from torpor.scheduling.costmodel import slo_seconds
from torpor.scheduling.peers import pick_peer
from torpor.scheduling.scheduler import Action
from torpor.settings import LogSettings
from torpor.stats import ModelStats, empty_stats
from torpor.tensors import InferRequest, InferResponse
from torpor.tracing import Trace, Tracer

if TYPE_CHECKING:  # the swap engine is imported only when --devices asks for it (it needs torch)
    from torpor.runtime.device_path import DeviceRuntime

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


def _shape_str(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


class Engine:
    def __init__(self, options: EngineOptions, factory: Factory):
        self.options = options
        self.shm = SharedMemoryManager(options.allow_client_shm)
        self.rules = RequestRules(options, self.shm)  # validation and responses (torpor.dataplane.request_rules)
        self.tracer = Tracer()  # request tracing (torpor.tracing): settings, sampling, the trace file
        self.logging = LogSettings()
        workers = options.worker_threads or min(32, (os.cpu_count() or 1) + 4)
        self.workers = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="torpor-exec")
        self.batcher = HostBatcher(self.workers)  # dynamic batching of host-run models
        # the models and their lifecycle (torpor.registry.lifecycle)
        self.registry = ModelRegistry(options, factory, self.workers)
        # torpor.runtime.device_path.DeviceRuntime when --devices names any (the swap engine)
        self.runtime: DeviceRuntime | None = None
        self.live = False
        self.exiting = False
        self.inflight = 0
        self._idle: asyncio.Event | None = None
        # the node among its peers (torpor.dataplane.cluster): their reports, the forward-once rule
        self.cluster = PeerTable()
        self._report_epoch = ReportEpoch()

    # ---------------------------------------------------------------------------------------
    # start / stop
    # ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.options.devices and self.options.devices != "none":
            # Imported here: the swap engine (devices, residency) needs torch, the rest of the engine does not.
            from torpor.runtime.device_path import DeviceRuntime

            self.runtime = await DeviceRuntime.open(self.options, self.workers)
            self.registry.binder = self.runtime  # loaded models with layer groups are bound to the devices
        self._idle = asyncio.Event()
        self._idle.set()
        await self.registry.start()
        self.live = True

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
        await self.registry.stop()
        self.shm.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        if self.runtime is not None:
            self.runtime.close()
        self.tracer.close()

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
        return not self.options.strict_readiness or self.registry.all_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
            return True
        except TorporError:
            return False

    def resolve(self, name: str, version: str = "") -> tuple[ModelEntry, VersionEntry]:
        """The READY version a request names (latest READY when `version` is empty)."""
        return self.registry.resolve(name, version)

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

    def is_decoupled(self, name: str, version: str = "") -> bool:
        """A READY version of `name` streams its responses (decoupled transaction policy)."""
        try:
            entry, _ = self.resolve(name, version)
        except TorporError:
            return False
        return entry.decoupled

    def has_model(self, name: str) -> bool:
        """The repository or a load named it (ready or not)."""
        return self.registry.knows(name)

    # ---------------------------------------------------------------------------------------
    # the model repository extension (torpor.registry.lifecycle does the work)
    # ---------------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict]:
        return self.registry.repository_index(ready_only)

    async def load(self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None,
                   _internal: bool = False) -> None:
        await self.registry.load(name, config_json, files, _internal)

    async def unload(self, name: str, unload_dependents: bool = False, _internal: bool = False) -> None:
        await self.registry.unload(name, unload_dependents, _internal)

    async def poll_once(self) -> None:
        await self.registry.poll_once()

    # ---------------------------------------------------------------------------------------
    # the shared-memory, trace and logging extensions
    # ---------------------------------------------------------------------------------------
    def shm_status(self, kind: str, name: str = "") -> list:
        return self.shm.system_status(name) if kind == "system" else self.shm.cuda_status(name)

    def shm_register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shm.register_system(name, key, offset, byte_size)

    def shm_register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.shm.register_cuda(name, raw_handle, device_id, byte_size)

    def shm_unregister(self, kind: str, name: str = "") -> None:
        if kind == "system":
            self.shm.unregister_system(name)
        else:
            self.shm.unregister_cuda(name)

    def trace_settings(self, model: str | None = None, changes: dict | None = None) -> dict:
        """Triton's trace settings (global, or one model's); `changes` updates them first."""
        return self.tracer.settings(model or "", changes)

    def trace_request(self, model: str, protocol: str, carrier: Any = None) -> Trace | None:
        """A front end's request as it arrives: its Trace when sampled (pass it to `infer`,
        stamp the protocol's points, `end()` it once answered), else None. `protocol`: "HTTP"
        or "GRPC"; `carrier`: headers or gRPC metadata (or a callable returning them), read
        only for a propagated OpenTelemetry context."""
        return self.tracer.sample(model, protocol, carrier) if self.tracer.on else None

    def log_settings(self, changes: dict | None = None) -> dict:
        return self.logging.update(changes) if changes is not None else self.logging.get()

    def begin_exit(self) -> None:
        """Refuse new requests from now on (readiness turns false); in-flight ones finish."""
        self.exiting = True

    def is_exiting(self) -> bool:
        return self.exiting

    def in_flight(self) -> int:
        return self.inflight

    # ---------------------------------------------------------------------------------------
    # statistics and residency
    # ---------------------------------------------------------------------------------------
    def has_devices(self) -> bool:
        """Models are bound to devices late, per request (--devices)."""
        return self.runtime is not None

    def residency(self) -> dict:
        """The residency report (GET /v2/torpor/residency, the torpor_* gauges, a router's
        NodeView; shape in torpor.scheduling.peers): an epoch, per device its residents, free
        bytes, queue and predicted wait, per model where it is and its windowed SLO attainment."""
        return residency_report(self.registry, self.runtime, self.cluster, self._report_epoch,
                                self.options.default_slo_ms)

    def topology(self) -> dict:
        """The devices' links (measured or configured), the scheduler's state and per-model
        SLO accounting (GET /v2/torpor/topology)."""
        if self.runtime is None:
            return {"devices": [], "links": [], "note": "no devices configured (--devices): models run where loaded"}
        return self.runtime.topology()

    # ---------------------------------------------------------------------------------------
    # peers: forward once (issue 22; torpor.api.forward does the I/O)
    # ---------------------------------------------------------------------------------------
    def set_peers(self, node: str, peers: list[str], stale_s: float) -> None:
        """This node's name (the forwarded-request marker carries it) and its peers' HTTP base URLs."""
        self.cluster.configure(node, peers, stale_s)

    def peer_report(self, peer: str, report: dict, rtt_s: float) -> None:
        """A peer's residency report, polled in `rtt_s` seconds."""
        self.cluster.update(peer, report, rtt_s)

    def peer_down(self, peer: str, why: str) -> None:
        """A peer's report could not be fetched: forward nothing to it until it answers again."""
        self.cluster.down(peer, why)

    def forward_target(self, model: str, version: str = "") -> str | None:
        """The peer to forward a request for this model to, or None to serve it here. A peer
        wins only where the model has landed on one of its devices and, counting its predicted
        wait, the model's execution and the measured forwarding overhead, it answers sooner than
        the local swap (host or peer copy) the scheduler would start; a model resident here, one
        that runs where it was loaded, a decoupled or a sequence model is never forwarded."""
        if self.runtime is None or not self.cluster.active():
            return None
        try:
            entry, ve = self.resolve(model, version)
        except TorporError:
            return None  # answered here, with the error a client expects
        if ve.pool_key is None or entry.decoupled or entry.config.HasField("sequence_batching") \
                or self.runtime.holds(ve.pool_key):
            return None
        candidates = self.cluster.candidates(f"{entry.name}:{ve.version}")
        if not candidates:
            return None
        default = entry.slo_ms if entry.slo_ms is not None else self.options.default_slo_ms
        local = self.runtime.local_estimate(ve.pool_key, slo_seconds(None, default, None))
        if local is not None and local[0] not in (Action.SWAP, Action.PEER):
            return None
        return pick_peer(local[1] if local is not None else float("inf"), candidates)

    def forward_done(self, peer: str, protocol: str, outcome: str, seconds: float, server_s: float | None) -> None:
        """A forward ended (torpor.dataplane.cluster.PeerTable.done says how)."""
        self.cluster.done(peer, protocol, outcome, seconds, server_s)

    def forwarded_in(self, protocol: str) -> None:
        """A peer forwarded this node a request (it carries the marker: never forwarded again)."""
        self.cluster.received[protocol] += 1

    def cluster_state(self) -> dict:
        """The peers as this node knows them and the forwards counted (the metrics' source)."""
        return self.cluster.describe()

    def swap_counters(self) -> dict:
        """Per (model, version): the swap engine's counters (swap-ins, bytes, hits, ...)."""
        return self.runtime.counters() if self.runtime is not None else {}

    def model_stats(self) -> list[ModelStats]:
        """The statistics of every READY version, by name and version (the metrics' source)."""
        return [ve.stats for _, ve in self.registry.ready_versions() if ve.stats is not None]

    def _stats_dict(self, name: str, ve: VersionEntry) -> dict:
        if ve.stats is None:
            return empty_stats(name, str(ve.version))
        ve.stats.memory_usage = self.runtime.memory_usage(ve.pool_key) if self.runtime and ve.pool_key else []
        return ve.stats.to_dict()

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        if not name:
            return [self._stats_dict(n, ve) for n, ve in self.registry.ready_versions()]
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

    async def infer(self, request: InferRequest, trace: Trace | None = None) -> InferResponse:
        """One request, one response (non-decoupled models); `trace`: see `trace_request`."""
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
                return await self._run(entry, ve, request, trace)
            finally:
                stats.pending -= 1
        finally:
            self._end()

    async def infer_stream(self, request: InferRequest, trace: Trace | None = None) -> AsyncIterator[InferResponse]:
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
                    yield await self._run(entry, ve, request, trace)
                    return
                async for resp in self._run_decoupled(entry, ve, request, trace):
                    yield resp
            finally:
                stats.pending -= 1
        finally:
            self._end()

    def _admit(self, entry: ModelEntry, ve: VersionEntry) -> None:
        """Refuse a request the model's queue has no room for, so a burst or a stuck model costs
        a bounded number of waiting requests, not unbounded memory. Triton's max_queue_size
        counts requests waiting, those in a dynamic batch's delay window included; a device-bound
        model's are counted as those beyond its instances (the device runtime queues them)."""
        limit = entry.max_queue_size if entry.max_queue_size > 0 else self.options.max_queue_size
        if limit <= 0:
            return
        pending = ve.stats.pending
        waiting = pending - (ve.executing if ve.pool_key is None else min(pending, ve.capacity))
        if waiting >= limit:
            ve.stats.record_failure(0, "REJECTED")
            raise unavailable(f"Exceeds maximum queue size: model '{entry.name}' has {waiting} requests waiting, "
                              f"at most {limit} may wait for its {ve.capacity} instance(s)")

    async def _run(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest,
                   trace: Trace | None = None) -> InferResponse:
        stats = ve.stats
        t0 = request.arrival_ns
        t_queue = time.monotonic_ns() if trace is not None else 0
        pinned = self._pin_regions(request) if self.shm.has_regions() else None
        try:
            mreq, batch = self.rules.prepare(entry, ve, request)
            deadline = request_deadline(request)
            if ve.pool_key is None and entry.batching is not None and self.batcher.wants(entry, ve):
                result, t_start, t_exec_start, t_done, executed = await self.batcher.run(
                    entry, ve, mreq, batch, deadline)
            else:
                # one request on an instance of its own (inline here: the common path, no extra frame)
                if deadline is None or not ve.slots.locked():
                    await ve.slots.acquire()
                else:
                    await acquire_slot_by(ve.slots, deadline)
                held = True
                ve.executing += 1
                try:
                    t_start = time.monotonic_ns()
                    executed = batch  # rows of the execution this request counts (0: rode in another's)
                    if ve.pool_key is not None:
                        job = DeviceJob(ve.pool_key, entry.name, ve.function, mreq, batch, request.arrival_ns,
                                        deadline, self._slo(entry, request), entry.max_batch_size, entry.batching,
                                        trace)
                        result, t_exec_start, executed = await self.runtime.run(job)
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
                    ve.executing -= 1
                    if held:
                        ve.slots.release()
            if isinstance(result, Exception):
                self._log_failure(entry, ve, result)
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
            self._log_failure(entry, ve, e)
            raise internal(f"{type(e).__name__}: {e}") from None
        finally:
            if pinned:
                self.shm.unpin(pinned)
        # A request that joined a device batch after the batch's memory was taken starts its
        # compute when it joined: no input time of its own, never a negative one.
        t_exec_start = max(t_exec_start, t_start)
        stats.record_success(
            batch,
            request_ns=t_end - t0,
            queue_ns=t_start - t0,
            input_ns=t_exec_start - t_start,
            infer_ns=t_done - t_exec_start,
            output_ns=t_end - t_done,
            executed_rows=executed,
        )
        if trace is not None:
            trace.request_done(entry.name, ve.version, request.id, t0, t_queue, t_start, t_exec_start, t_done, t_end)
        return response

    def _pin_regions(self, request: InferRequest) -> list | None:
        """The shared-memory regions the request names, held registered until it is answered
        (Triton defers unregistering a region in use)."""
        names = {t.parameters["shared_memory_region"] for t in request.inputs
                 if t.parameters and "shared_memory_region" in t.parameters}
        for o in request.outputs or ():
            if o.parameters and "shared_memory_region" in o.parameters:
                names.add(o.parameters["shared_memory_region"])
        return self.shm.pin({str(n) for n in names}) if names else None

    @staticmethod
    def _log_failure(entry: ModelEntry, ve: VersionEntry, error: BaseException) -> None:
        """A model's failed run, logged at the default verbosity as Triton's backends do."""
        text = error.message if isinstance(error, TorporError) else f"{type(error).__name__}: {error}"
        log.error("model '%s' version %s failed: %s", entry.name, ve.version, text)

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

    async def _run_decoupled(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest,
                             trace: Trace | None = None) -> AsyncIterator[InferResponse]:
        stats = ve.stats
        t0 = request.arrival_ns
        pinned = self._pin_regions(request) if self.shm.has_regions() else None
        try:
            async for resp in self._decoupled_responses(entry, ve, request, stats, t0, trace):
                yield resp
        finally:
            if pinned:
                self.shm.unpin(pinned)

    async def _decoupled_responses(self, entry: ModelEntry, ve: VersionEntry, request: InferRequest,
                                   stats: ModelStats, t0: int, trace: Trace | None) -> AsyncIterator[InferResponse]:
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

        t_queue = time.monotonic_ns() if trace is not None else 0
        await ve.slots.acquire()
        t_start = time.monotonic_ns()
        try:
            fut = loop.run_in_executor(self.workers, work)
        except BaseException:
            ve.slots.release()
            raise
        # As Triton's python backend: the instance is free for the next request as soon as the
        # model's `execute` returns; responses it sends later, from its own threads, still come
        # here until the final one (the request stays in flight, not in the queue, meanwhile).
        fut.add_done_callback(lambda _f: ve.slots.release())
        ve.executing += 1
        failed = False
        try:
            while True:
                outputs, error, final = await queue.get()
                if error is not None:
                    failed = True
                    err = error if isinstance(error, TorporError) else internal(str(error))
                    self._log_failure(entry, ve, err)
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
            ve.executing -= 1
        t_end = time.monotonic_ns()
        if failed:
            stats.record_failure(t_end - t0, "BACKEND")
        else:
            stats.record_success(batch, t_end - t0, t_start - t0, 0, t_end - t_start, 0)
            if trace is not None:  # a decoupled model's run has no input / output split
                trace.request_done(entry.name, ve.version, request.id, t0, t_queue, t_start, None, None, t_end)


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
