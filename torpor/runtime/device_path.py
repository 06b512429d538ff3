"""The engine's device path: late binding per request (issue 16's rules, torpor.scheduling.admission).

`DeviceRuntime.run` is what the engine calls for a model bound to devices: the scheduler picks
a device and the copy's source (`torpor.runtime.placer`); a request the scheduler predicts will miss its
objective is shed at once; a copy that harms no waiting request starts at arrival
(`DevicePool.start_copy`); the request then waits, holding nothing, for its stage on the device
(`torpor.runtime.staging`), is looked at once more when its turn comes (shed if late, or if its copy
would harm waiting requests), pins its model (resident, or swapped in with the copy pipelined
under its own execution), runs in the scheduler's order, possibly with requests of the same
model that joined it (`_DeviceBatch`, dynamic batching), and reports its time back to the
scheduler. `profile` runs a model a few times at load for the scheduler's first estimate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from torpor.config import ModelConfig, tensor_specs
from torpor.datatypes import numpy_dtype
from torpor.errors import internal, unavailable
from torpor.model import ModelFunction, ModelRequest
from torpor.runtime.executor import current_run
from torpor.runtime.placer import SLO_WINDOW_S, _name
from torpor.scheduling.admission import (
    defer_deadline,
    expires_at,
    outlasted,
    shed_at_arrival,
    shed_when_staged,
)
from torpor.scheduling.scheduler import Action, Outcome
from torpor.tracing import monotonic_from_perf

log = logging.getLogger("torpor")

INFLIGHT_PER_DEVICE = 64  # requests of one model version admitted per device (the scheduler queues them)

_SHED_WHY = {  # admission.shed_when_staged's reasons, in the refusal's words
    "late": "would finish past",
    "harms": "could only run by evicting a model other requests are waiting for, within",
    "stalls": "could only run by stalling requests queued before their objectives, within",
}


@dataclass(frozen=True, slots=True)
class DeviceJob:
    """One request as the device runtime sees it: all `DeviceRuntime.run` needs, and nothing
    of the data plane's own records."""

    key: Any  # the model version's key in the device pool
    model: str  # its name, for error texts
    function: ModelFunction
    request: ModelRequest
    batch: int  # rows it brings (1 for a model without batching)
    arrival_ns: int  # time.monotonic_ns() when it arrived
    deadline: float | None  # time.monotonic() when its timeout ends (None: none)
    slo: float | None  # its objective, seconds (None: none)
    max_batch_size: int
    batch_delay: float | None  # dynamic batching's queue delay, seconds (None: no dynamic batching)
    trace: Any = None  # torpor.tracing.Trace of a sampled request: the device path stamps TORPOR_* on it


class DeviceRuntime:
    """The device pool (`torpor.runtime.residency`) and the scheduler's seam to it (`torpor.runtime.placer`),
    and the requests of one model still forming a batch per device."""

    def __init__(self, pool: Any, placer: Any, *, shed_late: bool = True, profile_runs: int = 0,
                 workers: Any = None):
        self.pool = pool
        self.placer = placer
        self.shed_late = shed_late
        self.profile_runs = profile_runs
        self.workers = workers  # the executor for host-side work at load (None: the loop's default)
        self._batches: dict[tuple, _DeviceBatch] = {}  # (model key, device) -> batch still open

    @classmethod
    async def open(cls, options: Any, workers: Any = None) -> DeviceRuntime:
        """Devices, arenas (reserved and first-touched once, off the loop) and links (measured
        or configured) from the engine's options; a RuntimeError naming the flag on failure."""
        # imported here: the swap engine needs torch, the rest of the engine does not
        from torpor.runtime.devices import open_devices, parse_devices
        from torpor.runtime.links import build_links, parse_bandwidth_spec
        from torpor.runtime.placer import Placer
        from torpor.runtime.residency import DevicePool
        from torpor.scheduling.costmodel import TopologyError
        from torpor.scheduling.eviction import CostAwarePolicy, LRUPolicy

        spec = parse_devices(
            options.devices,
            memory_fraction=options.device_memory_fraction,
            memory_bytes=options.device_memory_bytes,
        )

        try:
            links_spec = (parse_bandwidth_spec(options.device_bandwidths)
                          if options.device_bandwidths else None)
        except TopologyError as e:
            raise RuntimeError(str(e)) from None
        eviction = LRUPolicy() if options.scheduler == "lru-swap" else CostAwarePolicy()
        # Arenas are reserved and first-touched here, once, off the loop; links measured too.
        try:
            pool = await asyncio.to_thread(lambda: DevicePool(open_devices(spec), policy=eviction,
                                                              lookahead=options.stage_lookahead))
            links = await asyncio.to_thread(build_links, pool.devices, links_spec)
            for m in pool.memories:
                pool.set_host_bandwidth(m.device, links.bandwidth(f"pcie:{m.device.name}"))
            placer = Placer(pool, links, policy=options.scheduler)
        except TopologyError as e:
            raise RuntimeError(str(e)) from None
        except (RuntimeError, ValueError, MemoryError) as e:
            text = str(e)
            hint = ""
            if isinstance(e, MemoryError) or "memory" in text.lower() and "allocat" in text.lower():
                hint = (" (another process may hold the memory: lower --device-memory-fraction "
                        "or set --device-memory-bytes)")
            raise RuntimeError(f"--devices {options.devices!r}: {text}{hint}") from None
        return cls(pool, placer, shed_late=options.shed_late, profile_runs=options.profile_runs, workers=workers)

    # -- the registry's Binder (torpor.registry.lifecycle) ------------------------------------
    async def bind(self, key: Any, fn: ModelFunction, config: ModelConfig) -> Any | None:
        """A loaded version that can be placed (weights in layer groups) goes into the host
        store (pinned where CUDA is present; no device is touched) and is profiled on a device:
        its key, or None for a model that runs where it was loaded."""
        groups = fn.layer_groups() if fn.placeable else []
        if not groups:
            return None
        await asyncio.get_running_loop().run_in_executor(self.workers, self.pool.register, key, groups, fn.module)
        await self.profile(key, fn, config, self.profile_runs)
        return key

    async def unbind(self, key: Any) -> None:
        await self.pool.unregister(key)
        self.placer.forget(key)

    def capacity(self, config: ModelConfig) -> int:
        return self.slots()

    # -- what the data plane reports (GET /v2/torpor/*, statistics, metrics) ------------------
    def residency(self) -> dict:
        """The devices' half of the residency report (torpor.scheduling.peers): the pool's arenas
        and residents, each device's queue and predicted wait (the placer's backlog: queued and
        running work with the copies it waits for), and per model version in the host store
        its state on each device, execution estimate and SLO met / missed over the placer's
        window (requests shed under overload count as missed)."""
        placer = self.placer
        report = self.pool.residency()
        where: dict[str, dict[str, str]] = {}
        for dev in report["devices"]:
            name = dev["name"]
            dev["queue_length"] = len(placer.tickets[name])
            dev["predicted_wait_s"] = round(placer.backlog(name), 6)
            for m in dev["models"]:
                where.setdefault(m["model"], {})[name] = m["state"]
        now = time.monotonic()
        models = {}
        registered = self.pool.store.keys()
        for key in registered:
            label = _name(key)
            slo = placer.slo.get(key)
            met, missed = slo.window.counts(now) if slo is not None else (0, 0)
            models[label] = {"devices": where.get(label, {}), "host": True,
                             "bytes": self.pool.store.get(key).nbytes,
                             "exec_s": round(placer.cost.exec_seconds(key, 1), 6),
                             "request_rate": round(self.pool.request_rate(key), 4),
                             "slo_window": {"met": met, "missed": missed}}
        report["models"] = models
        report["slo_window_s"] = SLO_WINDOW_S
        return report

    def holds(self, key: Any) -> bool:
        """The model is on one of the devices, landed or landing."""
        return any(key in m.residents for m in self.pool.memories)

    def local_estimate(self, key: Any, slo: float | None) -> tuple[str, float] | None:
        """What the scheduler would do now with a request for `key`, without doing it: (its
        action: run, queue, swap or peer; seconds until it would be answered); None where it
        has no option now. The forward-once rule weighs this against peers
        (torpor.scheduling.peers.pick_peer)."""
        decision = self.placer.place(key, slo, record=False)
        if decision is None or decision.option is None:
            return None
        return str(decision.option.action), decision.waited_s + decision.option.completion_s

    def topology(self) -> dict:
        return self.placer.describe()

    def counters(self) -> dict:
        return self.pool.counters()

    def memory_usage(self, key: Any) -> list[dict]:
        """Triton's memory_usage entries: where this version's weights are resident now."""
        out = []
        for m in self.pool.memories:
            r = m.residents.get(key)
            if r is not None:
                out.append({"type": "GPU" if m.device.kind == "cuda" else "CPU", "id": m.device.index,
                            "byte_size": r.nbytes})
        return out

    def slots(self) -> int:
        """Requests of one model version in flight at once: the devices' workers run one request
        at a time each, and the scheduler must see requests queued per device to place, queue or
        batch them, so this only bounds admission."""
        return INFLIGHT_PER_DEVICE * len(self.pool.memories)

    def close(self) -> None:
        self.pool.close()

    async def profile(self, key: Any, fn: ModelFunction, config: ModelConfig, runs: int) -> None:
        """A few runs on a device at load, on zero inputs of batch 1: the scheduler's first
        execution estimate, and the model's warm-up (first-run costs such as kernel selection
        are paid here, not by a user's request). Best effort: models with BYTES or variable-
        size inputs, or that fail on zeros, are left to be measured by real requests."""
        if runs <= 0:
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
            async with self.pool.acquire(key, device, timeout=30.0) as placement:
                if placement.outcome in (Outcome.HOST, Outcome.PEER):
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

    async def run(self, job: DeviceJob):
        """Late binding: the scheduler picks the device and the copy's source (torpor.runtime.placer);
        pin the model there (resident, or swapped in with the copy pipelined under this very
        execution), run, unpin. (result, execution start ns, rows of the execution it counts: its
        batch's for the request that opened it, 0 when it rode in another request's batch)."""
        key, placer, slo, batch, mreq = job.key, self.placer, job.slo, job.batch, job.request
        arrival = job.arrival_ns / 1e9  # the monotonic clock, as the placer's
        self.pool.arrived(key)
        decision = placer.place(key, slo, batch, arrival)
        probing = False
        # a request predicted hopeless is shed, unless its own model's estimate is what makes it so
        # and the model has not run for a while, or the model has been refused for a second: then
        # it runs as a probe (admission.probe)
        if self.shed_late and shed_at_arrival(decision) and not (probing := placer.probe(key, slo, batch)):
            placer.shed(key, "arrival", reason="late")
            raise unavailable(
                f"Exceeds maximum queue size: model '{job.model}' would answer "
                f"{(decision.waited_s + decision.option.completion_s) * 1e3:.0f} ms after arrival at the earliest, "
                f"past its {slo * 1e3:.0f} ms objective (request shed; the server is overloaded)")
        device, source = None, "auto"
        if decision is not None and decision.option is not None:
            o = decision.option
            if job.trace is not None:  # when the scheduler expects it done, to hold against COMPUTE_END
                job.trace.stamp("TORPOR_PREDICTED_END",
                                job.arrival_ns + int((decision.waited_s + o.completion_s) * 1e9))
            device = o.device
            source = "host" if o.action == Action.SWAP else (o.source if o.action == Action.PEER else "auto")
            if self.shed_late and not probing and slo is not None and o.action in (Action.SWAP, Action.PEER) \
                    and self.pool.stages[device].would_defer(key):
                # its copy would evict a model that waiting requests want, so it would wait for
                # them (torpor.runtime.staging); if they outlast its slack it would be shed then: now
                slack = arrival + slo - time.monotonic() - o.exec_s - placer.copy_seconds(key, device)
                if outlasted(placer.backlog(device), slack) and not (probing := placer.probe(key, slo, batch)):
                    placer.shed(key, "arrival", reason="harms")
                    raise unavailable(
                        f"Exceeds maximum queue size: model '{job.model}' would have to evict a model that "
                        f"waiting requests need, and they outlast its {slo * 1e3:.0f} ms objective "
                        f"(request shed; the server is overloaded)")
            if o.action in (Action.SWAP, Action.PEER):
                # Start the copy now where that evicts nothing a waiting request wants: the
                # request may wait several turns for its stage, and its model lands meanwhile.
                early = self.pool.start_copy(key, device, source)
                if early is not None:
                    placer.copy_started(early.resident, decision, early.outcome)
        ticket = placer.admit(key, decision, batch, slo, arrival, probe=probing)
        executed = batch
        try:
            if device is not None and job.batch_delay is not None:
                open_batch = self._batches.get((key, device))
                if open_batch is not None and open_batch.join(mreq, batch):
                    # Rides with requests already queued for that device: one execution for all.
                    ticket.ride()
                    res, t_exec_start = await open_batch.result(mreq)
                    executed = 0
                else:
                    res, t_exec_start, executed = await self._run_batch(job, device, source, ticket,
                                                                        probing=probing)
            else:
                res, t_exec_start, executed = await self._run_batch(job, device, source, ticket, batching=False,
                                                                    probing=probing)
        finally:
            ticket.done()
        placer.observe_latency(key, (time.monotonic_ns() - job.arrival_ns) / 1e9, slo,
                               ticket if executed else None)
        return res, t_exec_start, executed

    async def _run_batch(self, job: DeviceJob, device: str | None, source: str, ticket: Any,
                         batching: bool = True, probing: bool = False):
        """Acquire the model on `device` and execute the job's request, with whatever requests
        of the same model join it (`_DeviceBatch`) until the device's worker starts it: (its
        result, when it held the device's memory, the rows executed)."""
        placer, key = self.placer, job.key
        group = _DeviceBatch(job.max_batch_size, job.request, job.batch)
        if batching:
            self._batches[(key, device)] = group
        fn, trace = job.function, job.trace
        try:
            delay = job.batch_delay or 0.0
            if batching and delay > 0:
                # dynamic_batching.max_queue_delay_microseconds: hold the batch open that long
                # for others to join, unless it fills first
                await group.wait_full(delay)
            timeout = None if job.deadline is None else job.deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise unavailable("Request timeout expired: the request's timeout passed before it reached a device")

            copy_s = placer.copy_seconds(key, device) if device is not None else 0.0
            shed = self.shed_late and ticket.due < math.inf and not probing  # a probe runs whatever its estimate

            def on_stage(stage: Any, resident: bool) -> None:
                # its turn on the device: a last look before it takes memory or starts a copy
                # (stage None: still waiting at its last moment to start and be on time, expires_at: late)
                if trace is not None and stage is not None:
                    trace.stamp("TORPOR_STAGE_END")
                if not shed:
                    return
                why = "late" if stage is None else shed_when_staged(
                    time.monotonic(), ticket.estimate, copy_s, resident, ticket.due, stage.level,
                    lambda: placer.would_delay(ticket, copy_s))
                if why is not None:
                    placer.shed(key, "queued", len(group.members), reason=why)
                    raise unavailable(
                        f"Exceeds maximum queue size: model '{job.model}' request {_SHED_WHY[why]} its "
                        f"{(ticket.due - job.arrival_ns / 1e9) * 1e3:.0f} ms objective "
                        f"{'while it waited for its turn' if stage is None else 'when its turn came'} on "
                        f"{ticket.device} (request shed; the server is overloaded)")

            # with an objective, it may wait (holding nothing) while its copy would evict a model
            # that others wait for, as long as it could still start its copy and be on time
            defer_until = defer_deadline(ticket.due, ticket.estimate, copy_s) if shed else 0.0
            if trace is not None:
                trace.stamp("TORPOR_STAGE_START")
            expire_at = expires_at(ticket.due, ticket.estimate) if shed else math.inf
            async with self.pool.acquire(key, device, timeout=timeout, source=source, order=ticket.key,
                                            on_stage=on_stage, defer_until=defer_until, tag=ticket,
                                            expire_at=expire_at) as placement:
                placer.staged(ticket, placement)
                t_exec_start = time.monotonic_ns()
                if trace is not None:
                    trace.stamp("TORPOR_MEMORY_END", t_exec_start)

                def work():
                    ticket.started()
                    begun = time.monotonic_ns()
                    members, size = group.close()
                    t = time.perf_counter()
                    # execute_on runs in the device's worker, compute stream current, group waits armed
                    out = fn.execute_on((placement.module, placement.device), members)
                    run = current_run()
                    return (members, size, out, time.perf_counter() - t, begun, time.monotonic(),
                            run.wait_s if run is not None else 0.0)

                # queued on the device in the scheduler's order (its deadline, torpor.runtime.placer)
                members, size, outs, seconds, begun, ended, waited = await placement.run_ordered(ticket.key, work)
                placer.account(placement.device.name, key, placement.outcome == Outcome.HIT, seconds, waited,
                               ended - begun / 1e9)
                placer.lags.add("release", time.monotonic() - ended)
                if trace is not None:
                    trace.stamp("TORPOR_EXEC_START", begun)
                placer.ran(key)
                if placement.outcome == Outcome.HIT:
                    placer.observe_exec(key, seconds, size)
                if trace is not None:
                    _trace_copy(trace, placement, job.arrival_ns)
        except BaseException as e:
            group.fail(e)
            raise
        finally:
            if self._batches.get((key, device)) is group:
                del self._batches[(key, device)]
        group.deliver(members, outs, t_exec_start)
        return outs[0], t_exec_start, size


def _trace_copy(trace: Any, placement: Any, arrival_ns: int) -> None:
    """Where the request ran, and the copy of its model it waited for, if that copy was still
    landing when the request arrived (its own swap-in, one it joined, or one started for it at
    arrival): TORPOR_COPY_START / _END on the copy engine's clock. CPU copies stamp their
    end; on CUDA the end is the issue time plus the copy stream's measured time."""
    trace.attributes.update({"torpor.device": placement.device.name, "torpor.outcome": str(placement.outcome)})
    batch = placement.resident.batch
    if batch is None or not batch.done():
        return
    seconds = batch.seconds() or 0.0
    done = getattr(batch.events[-1], "t_done", 0.0) if batch.events else 0.0
    end = monotonic_from_perf(done or batch.t_issue + seconds)
    if end > arrival_ns:
        trace.stamp("TORPOR_COPY_START", end - int(seconds * 1e9))
        trace.stamp("TORPOR_COPY_END", end)


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
