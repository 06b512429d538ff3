"""Discrete-event simulator: the real Scheduler, CostModel and eviction policies on virtual time.

    result = simulate(load_scenario("loadtest/scenarios/h100x4.json"), policy="torpor")

What is simulated, and how:

- **Devices**: N GPUs, each with a weight budget (bytes; no fragmentation: the block arena's
  fragmentation is bounded by eviction, see `torpor.runtime.memory`), one request executing at a time,
  a FIFO queue. Topology is a node template (PCIe per GPU, PCIe-switch siblings, NVLink pairs
  with bandwidths; `torpor.scheduling.costmodel.LinkMap`) repeated for every `gpus_per_node` GPUs.
- **Transfers**: a copy gets its share of the narrowest link on its path when it starts
  (shared with copies already in flight on those links) and keeps that rate; its first group
  lands after the first group's bytes at that rate. Torpor's scheduler may have a copy wait
  for its path to clear and then move at the path's full rate (`Option.start_s`), holding its
  place on the links meanwhile. Under processor sharing (`SHARED_LINKS`, or
  `TORPOR_SIM_LINKS=shared`) every copy on a link is re-rated as copies start and land; there
  Torpor's scheduler sees when each copy should land if none joins (`ResidentState.eta`), and a
  copy that waits for its path takes no share until then, and later still if copies started
  meanwhile would otherwise be slowed past the deadline of a request waiting on them. A device computing a request whose model
  is still landing starts when the first group has landed and ends no earlier than the last
  group lands (pipelined swap).
- **Execution**: the model's profiled time times lognormal noise (`exec_noise`); each measured
  time refines the CostModel's moving estimate exactly as the engine's measurements do.
- **Batching**: a model with `max_batch` > 1 runs the requests of one model function waiting in
  a device's queue as one batch (up to `max_batch`), taking `exec(1) x (1 + batch_scale x (b-1))`;
  with `max_queue_delay_ms` a short batch at the head of an idle device waits up to that long for
  more (Triton's `max_batch_size` and `dynamic_batching.max_queue_delay_microseconds`).
- **Queue order**: first come, first served for the baselines. Torpor's devices serve their
  queue earliest deadline (arrival + SLO) first, the paper's SLO-aware queue in its simplest
  form: a 6 ms request with a 50 ms objective goes ahead of a 40 ms one with 400 ms to spare. A
  request goes ahead only of queued requests that still finish within their SLO margin
  (`Scheduler.slo_margin`) with it in front; otherwise it queues behind them all. A request the
  scheduler predicts will miss anyway queues behind every one that can still meet its SLO
  (`scheduler.HOPELESS_DELAY_S`). The rule is the server's own (`torpor.scheduling.admission.work_ahead`,
  which `torpor.runtime.placer` calls too); the simulator tells it when the running batch ends and when
  the new request's model would land on each device.
- **Work ahead** (`DeviceState.backlog_s`, what the scheduler is told): the projected end of the
  work queued ahead of the request being placed (all of it in FIFO order; under deadline order,
  what runs now and what is due before it, `torpor.scheduling.admission.work_ahead`), counting for each
  queued request the wait for its own copy to land, not only execution estimates (a queue of
  cold requests holds a device longer than the sum of their run times).
- **The server's admission** (`Staging`, a scenario's `"staging"` field, or
  `Simulation(..., staging=Staging())`): as `torpor.runtime.staging`, `torpor.runtime.residency` and the engine
  do it, with `torpor.scheduling.admission`'s rules. Each device hands out `1 + lookahead` stages in queue
  order (urgent requests at once); only a staged request pins its model and evicts (idle
  residents, those other requests wait for last). A request whose decision is a copy starts it
  at arrival where that evicts only idle models no waiting request wants (`spare_victims`),
  else when it is staged, roughly when the request `lookahead` places ahead of it starts to
  run. Copies to one device go one at a time at the path's full rate (the CPU device's copy
  thread, a CUDA device's copy stream). The scheduler sees when a new request would be staged
  (`DeviceState.stage_in_s`), and, as the server's placer shows it, a model a queued request
  not yet staged will copy in as a resident (pinned, its bytes taken from the free bytes)
  landing by the time that request runs (`torpor.scheduling.admission.planned_residents`), so later
  requests of that model queue behind it rather than each pricing a copy. With `shed`: a request predicted past its whole SLO is answered
  UNAVAILABLE at arrival, and so is one whose copy would evict a model waiting requests want
  when the work queued there outlasts its slack; a request whose copy would harm or cost
  waiting requests is deferred while it has slack (`harm_level`); when staged, one that can no
  longer be on time, still harms them, or costs them and would stall the device past a queued
  request's guard (`would_delay`) is answered then. The run reports `shed_arrival`,
  `shed_queued` and, with `max_outstanding`, arrivals the client `dropped`. Without it (the
  default) copies start at placement and nothing is shed: the model the README's simulator
  numbers were measured with.
- **Decisions**: `torpor.scheduling.scheduler.Scheduler.place` on a `Snapshot` the simulator keeps up to
  date (device states are the simulator's own state objects, not copies); eviction order from
  `torpor.scheduling.eviction` (CostAwarePolicy for "torpor", LRUPolicy for "lru-swap"). When no device
  can make room (everything pinned), the request waits and is retried when work finishes.
- **Workload** (`torpor.sim.workload.make_arrivals`): the paper's trace turned into arrivals as its README
  says, or a synthetic generator with the trace's statistics (optionally Zipf, on/off bursts,
  diurnal).

Nothing here imports torch: it runs on any machine with numpy.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections import deque

import numpy as np

from torpor.scheduling.admission import (
    FREE,
    HARMS,
    defer_deadline,
    deferred,
    harm_level,
    outlasted,
    planned_residents,
    shed_at_arrival,
    shed_when_staged,
    spare_victims,
    stage_at_once,
    stage_level,
    stage_next,
    victim_order,
    work_ahead,
    would_delay,
)
from torpor.scheduling.costmodel import CostModel, ExecEstimator
from torpor.scheduling.eviction import Candidate, RateMeter
from torpor.scheduling.scheduler import (
    HOPELESS_DELAY_S,
    POLICIES,
    DeviceState,
    ModelInfo,
    ResidentState,
    Scheduler,
    Snapshot,
    hopeless,
    static_assignment,
)
from torpor.sim.physics import LinkSharing, _links_from_env
from torpor.sim.scenario import Scenario, ScenarioError, Staging
from torpor.sim.state import (
    _ACTION_CODE,
    _BEGIN,
    _COPIED,
    _DONE,
    _LANDED,
    _RELEASE,
    _RETRIES,
    _STAGE,
    _WAKE,
    DROPPED,
    LATENCY_PCTS,
    SHED_ARRIVAL,
    SHED_QUEUED,
    UNSERVED,
    SimResult,
    _defer_until,
    _Dev,
    _Job,
    _order,
)

# The link physics of both simulators (this one and `torpor.sim.paper_sim`), read when a simulation
# is built: False, fixed shares; True, processor sharing (`LinkSharing`).
SHARED_LINKS = _links_from_env()


class Simulation:
    def __init__(self, scenario: Scenario, policy: str, n_gpus: int | None = None, *,
                 staging: Staging | None = None):
        """`staging`: the server's admission (`Staging`); default the scenario's."""
        if policy not in POLICIES:
            raise ScenarioError(f"policy: unknown policy {policy!r}; expected one of {list(POLICIES)}")
        self.sc = scenario
        self.policy = policy
        self.n = n_gpus or scenario.gpus
        self.links = scenario.links(self.n)
        mix = scenario.models
        self.fn_model = [mix[f % len(mix)] for f in range(scenario.functions)]
        est = ExecEstimator()
        for f, m in enumerate(self.fn_model):
            for b in range(1, m.max_batch + 1):  # the load-time profile (a few warm runs in the engine)
                est.seed(f, m.exec_seconds(b), b)
        self.cost = CostModel(self.links, est)
        self.devs = [_Dev(DeviceState(name, scenario.weight_budget, scenario.weight_budget, version=0))
                     for name in self.links.devices]
        self.by_name = {d.state.name: d for d in self.devs}
        self.rates = [RateMeter(tau=60.0) for _ in range(scenario.functions)]
        self.holder_count: dict[int, int] = {}
        self.inflight: dict[str, int] = {}
        self.xfer = LinkSharing(self.links, self.cost.transfer_latency_s, self.inflight, SHARED_LINKS)
        self.snap = Snapshot(0.0, [d.state for d in self.devs], self.inflight,
                             lambda k: self.rates[k].rate(self.snap.now), self.holder_count,
                             self.xfer if SHARED_LINKS else None, self.xfer.clear_at)
        self.first_at: dict[tuple[str, int], float] = {}
        self.static_map: dict[int, str] = {}
        self.scheduler = Scheduler(self.cost, policy)
        self.queue_order = "deadline" if policy == "torpor" else "fifo"
        self.models = [ModelInfo(f, m.nbytes, m.first_group_bytes, m.slo_s) for f, m in enumerate(self.fn_model)]
        self.staging = staging if staging is not None else scenario.staging
        if self.staging is not None:
            # as the server's placer sees copies: counts per link and when each link clears,
            # not the bytes each copy has left; copies are the devices' own (`_start_copy`)
            clear = self._clear = {}
            self.snap.inflight_bytes = None
            self.snap.link_clear = lambda lk: clear.get(lk, -math.inf)

    def preload(self, functions: list[int]) -> None:
        """Models resident before traffic, as a warm-up leaves them: one request per function in
        this order, each on the first device, the least recently used going where it does not fit."""
        d = self.devs[0]
        for i, f in enumerate(functions):
            if f in d.state.residents:
                continue
            while d.state.free_bytes < self.models[f].nbytes and d.state.residents:
                self._evict(d, min(d.state.residents.values(), key=lambda r: r.last_used).key)
            r = self._add_resident(d, f, 0.0, 0.0)
            r.last_used = i - len(functions)

    def _prepare_static(self, arrivals_fn: np.ndarray, duration: float) -> None:
        counts = np.bincount(arrivals_fn, minlength=self.sc.functions)
        items = [(f, m.nbytes, counts[f] / duration * m.exec_s) for f, m in enumerate(self.fn_model)]
        self.static_map = static_assignment(items, [(d.state.name, d.state.capacity) for d in self.devs])
        self.scheduler.static_map = self.static_map
        for f, name in self.static_map.items():  # native: loaded before traffic, resident forever
            self._add_resident(self.by_name[name], f, 0.0, 0.0)

    def _add_resident(self, d: _Dev, f: int, first: float, full: float) -> ResidentState:
        r = ResidentState(f, self.models[f].nbytes, ready_at=full, last_used=self.snap.now)
        d.state.residents[f] = r
        d.state.version += 1
        d.state.free_bytes -= r.nbytes
        self.holder_count[f] = self.holder_count.get(f, 0) + 1
        self.first_at[(d.state.name, f)] = first
        return r

    def _evict(self, d: _Dev, f: int) -> None:
        r = d.state.residents.pop(f)
        d.state.version += 1
        d.state.free_bytes += r.nbytes
        self.holder_count[f] -= 1
        self.first_at.pop((d.state.name, f), None)

    def run(self, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float, *,
            stop_below: float | None = None, max_outstanding: int | None = None) -> SimResult:
        """Replay the arrivals. `stop_below`: give up (attainment reported as an upper bound,
        `stopped` set) once more requests have missed their SLO than that attainment allows;
        the GPU-count search uses it to skip hopeless configurations. `max_outstanding` (with
        `staging`): an arrival finding that many requests unanswered is not sent (a load
        client's cap, as loadtest/e2e.py's --max-outstanding). Per request afterwards:
        `latency` (inf: not answered) and `status` (ANSWERED, SHED_ARRIVAL, ...)."""
        t_wall = time.perf_counter()
        rng = np.random.default_rng(self.sc.seed + 1)
        noise = (rng.lognormal(0.0, self.sc.exec_noise, size=len(arrivals_t)) if self.sc.exec_noise
                 else np.ones(len(arrivals_t)))
        if self.policy == "static":
            self._prepare_static(arrivals_fn, duration)
        n_req = len(arrivals_t)
        latency = np.full(n_req, np.inf)
        # per request, for diagnosis: the scheduler's predicted latency and chosen action
        self.predicted = predicted = np.full(n_req, np.nan)
        self.action_of = action_of = np.zeros(n_req, dtype=np.int8)
        self.latency = latency
        self.status = status = np.zeros(n_req, dtype=np.int8)
        self.copies: list[tuple[float, int, float, float]] = []  # staging: (issued, request, starts, lands)
        # staging: when each request held its stage and its model (the engine's compute_infer
        # counts from then: the wait for the device and for its copy, and its run)
        self.acquired = acquired = np.full(n_req, np.nan)
        heap: list = []
        seq = 0
        pending: deque = deque()
        swaps = peers = moved = evictions = waits = unserved = 0
        shed_arrival = shed_queued = dropped = in_system = 0
        actions: dict[str, int] = {}
        misses = 0
        allowed = math.inf if stop_below is None else (1.0 - stop_below) * len(arrivals_t)
        stopped = False
        snap, sched, cost = self.snap, self.scheduler, self.cost
        devs, by_name = self.devs, self.by_name
        fn_model, models, rates = self.fn_model, self.models, self.rates
        edf = self.queue_order == "deadline"
        # processor sharing: Torpor's scheduler sees when each copy should land if no other joins
        # (`ResidentState.eta`), not the landing at the rate it has now
        staging = self.staging
        staged = staging is not None
        etas = edf and self.xfer.shared and not staged
        listq = edf or staged  # queues kept sorted by (key, seq) in a list
        if listq:
            for d in devs:
                d.queue = []
        if staged:
            permits = 1 + staging.lookahead  # one execution at a time per device
            shedding = staging.shed
            evict_policy = sched.eviction

            def size_of(f: int) -> int:
                return models[f].nbytes

        def start_next(d: _Dev, now: float) -> None:
            nonlocal seq
            if d.running or not d.queue:
                return
            head: _Job = d.queue[0]
            f = head.fn
            spec = fn_model[f]
            same = d.queued_fn.get(f, 0)
            if spec.max_batch > 1 and same < spec.max_batch and spec.max_queue_delay_s > 0:
                # dynamic batching: a short batch waits for more requests up to the queue delay
                hold = head.enqueued + spec.max_queue_delay_s
                if now < hold:
                    if d.hold_until != hold:
                        d.hold_until = hold
                        heapq.heappush(heap, (hold, seq, _WAKE, d))
                        seq += 1
                    return
            if listq:
                d.queue.pop(0)
            else:
                d.queue.popleft()
            batch = [head]
            if spec.max_batch > 1 and same > 1:
                # requests of one model function anywhere in the queue join the head's batch
                # (Triton's dynamic batcher); the rest keep their order
                keep = []
                for j in d.queue:
                    if j.fn == f and len(batch) < spec.max_batch:
                        batch.append(j)
                    else:
                        keep.append(j)
                d.queue = keep if listq else deque(keep)
            b = len(batch)
            d.queued_fn[f] = same - b
            r = head.resident
            begin = max(now, self.first_at.get((d.state.name, f), 0.0))
            ex = spec.exec_seconds(b) * noise[head.rid]
            done = max(begin + ex, r.ready_at)
            d.running = True
            d.busy_until = done
            d.run_start = now
            d.exec_end = begin + ex
            d.cur_res = r
            d.cur_batch = (batch, ex)
            d.cur_deadline = min(j.due for j in batch)
            d.cur_hit = r.ready_at <= now
            for j in batch:
                j.started_at = now
            d.tok += 1
            d.batches += 1
            d.batched += b
            if not edf:  # re-anchor the projection of queued work on this batch's real end
                t_end = done
                for j in d.queue:
                    t_end = max(max(t_end, j.first_at) + j.estimate, j.resident.ready_at)
                d.proj_end = t_end
            heapq.heappush(heap, (done, seq, _DONE, (d, batch, ex, d.tok)))
            seq += 1

        def rerated(trs: list, now: float) -> None:
            # copies whose landing moved: their residents, locks, events and any run waiting on them
            nonlocal seq
            for tr in trs:
                d, r, src = tr.owner
                r.ready_at = tr.end
                if etas:
                    r.eta = self.xfer.eta(tr, now)
                if src is not None:
                    src.locked_until = max(src.locked_until, tr.end)
                heapq.heappush(heap, (tr.end, seq, _LANDED, (tr, tr.version)))
                seq += 1
                if d.running and d.cur_res is r:
                    done = max(d.exec_end, tr.end)
                    if done != d.busy_until:
                        d.busy_until = done
                        d.tok += 1
                        batch, ex = d.cur_batch
                        heapq.heappush(heap, (done, seq, _DONE, (d, batch, ex, d.tok)))
                        seq += 1

        # ---- the server's staging (`Staging`): the rules are torpor.scheduling.admission's ----------------
        def candidates(d: _Dev, now: float, idle_only: bool) -> list[Candidate]:
            # the residents of `d` as the server's eviction sees them (torpor.runtime.memory.candidates)
            bw = self.links.bandwidth(self.links.host_path(d.state.name)[0])
            return [Candidate(r.key, r.nbytes, r.last_used, rates[r.key].rate(now), r.nbytes / bw,
                              self.holder_count.get(r.key, 1) - 1)
                    for r in d.state.residents.values() if not idle_only or r.evictable(now)]

        def level(d: _Dev, f: int, now: float) -> int:
            # what staging f on d now does to requests with an objective waiting there
            # (torpor.runtime.residency's `_blocker`)
            res = d.state.residents
            need = models[f].nbytes - d.state.free_bytes
            if f in res or need <= 0:
                return FREE
            wanted = d.protected
            victims = ((c.key, c.nbytes, c.rate) for c in victim_order(evict_policy, candidates(d, now, False), now,
                                                                        wanted))
            return harm_level(f, need, res, victims, wanted, rates[f].rate(now))

        def want(d: _Dev, job: _Job, n: int) -> None:
            for counts in (d.wanted, d.protected) if job.defer_until > 0 else (d.wanted,):
                c = counts.get(job.fn, 0) + n
                if c > 0:
                    counts[job.fn] = c
                else:
                    del counts[job.fn]

        def enter_stage(d: _Dev, job: _Job, now: float) -> None:
            # torpor.runtime.staging.StagingQueue.enter
            # (a request that waits is marked passed over where it would be deferred right away,
            # before it counts among those waiting: the tag)
            head = d.waiting[0].key if d.waiting else None
            at_once = stage_at_once(job.key, len(d.holders), permits, head, (h.key for h in d.holders))
            passed = deferred(now, job.defer_until, lambda: level(d, job.fn, now))
            if at_once and not passed:
                stage(d, job, now, stage_level(job.defer_until, lambda: level(d, job.fn, now)))
            else:
                bisect.insort(d.waiting, job, key=_order)
                job.passed = passed
                want(d, job, 1)
            grant(d, now)

        def grant(d: _Dev, now: float) -> None:
            # torpor.runtime.staging.StagingQueue._grant: the lowest waiting request not deferred, while
            # stages are free; a timer for when the first one passed over runs out of deferral
            nonlocal seq
            i: int | None = 0
            while len(d.holders) < permits and d.waiting:
                start = i
                i, wake = stage_next(d.waiting, now, _defer_until, lambda j: level(d, j.fn, now), i)
                for j in d.waiting[start:i]:  # those it scanned past were deferred: passed over
                    j.passed = True
                if wake < d.wake_at:
                    d.wake_at = wake
                    heapq.heappush(heap, (wake, seq, _STAGE, d))
                    seq += 1
                if i is None:
                    break
                job = d.waiting.pop(i)
                job.passed = False
                want(d, job, -1)
                stage(d, job, now, stage_level(job.defer_until, lambda j=job: level(d, j.fn, now)))

        def finish(d: _Dev, job: _Job) -> None:
            nonlocal in_system
            d.tickets.remove(job)
            in_system -= 1

        def stage(d: _Dev, job: _Job, now: float, lvl: int) -> None:
            # it holds a stage: a last look (the engine's on_stage), then memory, then the
            # device's queue
            nonlocal shed_queued, misses
            why = None
            if shedding and job.due < math.inf:
                why = shed_when_staged(now, job.estimate, job.copy_s, job.fn in d.state.residents, job.due, lvl,
                                       lambda: would_delay([k for k in d.tickets if k is not job], now,
                                                           job.estimate + job.copy_s, staging.lookahead))
            if why is not None:
                status[job.rid] = SHED_QUEUED
                shed_queued += 1
                misses += 1
                finish(d, job)
                return
            d.holders.append(job)
            if not acquire(d, job, now):
                d.memwait.append(job)

        def acquire(d: _Dev, job: _Job, now: float) -> bool:
            # torpor.runtime.residency._acquire_staged: pin it where resident, else evict idle residents
            # (models others wait for last) and start its copy; False: no room yet
            nonlocal evictions
            f = job.fn
            r = d.state.residents.get(f)
            if r is None:
                nbytes = models[f].nbytes
                if d.state.free_bytes < nbytes:
                    for c in victim_order(evict_policy, candidates(d, now, True), now, d.wanted):
                        self._evict(d, c.key)
                        evictions += 1
                        if d.state.free_bytes >= nbytes:
                            break
                    else:
                        return False
                r = start_copy(d, f, job.rid, job.source, now)
            r.pins += 1
            r.last_used = now
            acquired[job.rid] = now
            job.resident = r
            job.staged = True
            job.first_at = self.first_at.get((d.state.name, f), 0.0)
            bisect.insort(d.queue, job, key=_order)
            d.queued_fn[f] = d.queued_fn.get(f, 0) + 1
            start_next(d, now)
            return True

        def start_copy(d: _Dev, f: int, rid: int, source: str | None, now: float) -> ResidentState:
            # one copy at a time per device, each at its path's full rate; from the peer
            # device `source` where it holds a landed copy and there is a path, else the host
            nonlocal seq, swaps, peers, moved
            name = d.state.name
            path = self.links.host_path(name)
            src = None
            if source is not None:
                s = by_name[source].state.residents.get(f)
                ppath = self.links.peer_path(source, name)
                if s is not None and s.ready_at <= now and ppath is not None:
                    src, path = s, ppath
            begin = max(now + staging.copy_delay_s, d.copy_free_at)
            full = begin + cost.nominal_seconds(models[f].nbytes, path)
            d.copy_free_at = full
            self.copies.append((now, rid, begin, full))
            r = self._add_resident(d, f, begin + cost.nominal_seconds(models[f].first_group_bytes, path), full)
            if src is not None:
                src.locked_until = max(src.locked_until, full)
                peers += 1
            else:
                swaps += 1
            moved += models[f].nbytes
            clear = self._clear
            for lk in path:
                self.inflight[lk] = self.inflight.get(lk, 0) + 1
                clear[lk] = max(clear.get(lk, -math.inf), full)
            heapq.heappush(heap, (full, seq, _COPIED, (d, path)))
            seq += 1
            return r

        def retry_memory(d: _Dev, now: float) -> None:
            while d.memwait and acquire(d, d.memwait[0], now):
                d.memwait.pop(0)

        def admit(rid: int, f: int, arrival: float, now: float) -> bool:
            # the engine's way in (torpor.dataplane.engine._run_on_device, torpor.runtime.placer): place, shed at
            # arrival, open a ticket, wait for a stage
            nonlocal unserved, misses, shed_arrival, in_system, evictions
            snap.now = now
            spec = fn_model[f]
            due = arrival + spec.slo_s
            ex_new = cost.exec_seconds(f)
            planned = []
            for d in devs:
                ends: list = []
                backlog, d.next_key, stage_in = work_ahead(d.tickets, now, due if edf else None, ex_new,
                                                           staging.lookahead, ends=ends)
                d.state.backlog_s = max(0.0, backlog)
                d.state.stage_in_s = max(0.0, stage_in)
                d.state.queue_len = len(d.tickets)
                # as torpor.runtime.placer's snapshot: a model a queued request will copy in shows as a
                # resident landing by the time that request runs, its bytes off the free bytes;
                # the device's own state carries them for this decision only
                plan = planned_residents(ends, d.state.residents, size_of, now)
                if plan:
                    planned.append((d, plan, d.state.free_bytes))
                    free = d.state.free_bytes
                    for r in plan:
                        d.state.residents[r.key] = r
                        self.holder_count[r.key] = self.holder_count.get(r.key, 0) + 1
                        free = max(0, free - r.nbytes)
                    d.state.free_bytes = free
            model = models[f]
            if now > arrival:
                model = ModelInfo(f, model.nbytes, model.first_group_bytes, model.slo_s, 1, now - arrival)
            dec = sched.place(model, snap)
            for d, plan, free in planned:
                for r in plan:
                    del d.state.residents[r.key]
                    self.holder_count[r.key] -= 1
                d.state.free_bytes = free
            if dec is None:
                return False
            o = dec.option
            if o is None:
                status[rid] = UNSERVED
                unserved += 1
                misses += 1
                return True
            actions[o.action] = actions.get(o.action, 0) + 1
            predicted[rid] = now - arrival + o.completion_s
            action_of[rid] = _ACTION_CODE[o.action]
            if shedding and shed_at_arrival(dec):
                status[rid] = SHED_ARRIVAL
                shed_arrival += 1
                misses += 1
                return True
            d = by_name[o.device]
            copy_s = cost.nominal_seconds(spec.nbytes, self.links.host_path(d.state.name))
            copy = o.action in ("swap", "peer")
            if shedding and copy and level(d, f, now) == HARMS:
                # its copy would evict a model waiting requests want: it would wait for them, and
                # be shed if they outlast its slack; when the work queued there already does, now
                slack = arrival + spec.slo_s - now - o.exec_s - copy_s
                if outlasted(work_ahead(d.tickets, now, None, 0.0, staging.lookahead)[0], slack):
                    status[rid] = SHED_ARRIVAL
                    shed_arrival += 1
                    misses += 1
                    return True
            if copy and f not in d.state.residents:
                # the copy starts now where it evicts only idle models no waiting request wants
                # (torpor.runtime.residency.DevicePool.start_copy); the request finds it when staged
                victims = victim_order(evict_policy, candidates(d, now, True), now, d.wanted)
                spare = spare_victims(victims, d.state.free_bytes, spec.nbytes, d.wanted)
                if spare is not None:
                    for c in spare:
                        self._evict(d, c.key)
                        evictions += 1
                    start_copy(d, f, rid, o.source if o.action == "peer" else None, now)
            job = _Job(rid, f, arrival, ex_new, None, dec.meets_slo, now, 0.0, due)
            job.key = (d.next_key + HOPELESS_DELAY_S if hopeless(dec) else d.next_key) if edf else math.inf
            job.guard = arrival + spec.slo_s * sched.slo_margin
            if copy:  # as Placer.admit
                job.transfer = o.transfer_s - o.start_s
                job.ready = now + o.transfer_s
                job.source = o.source if o.action == "peer" else None
            else:
                r = d.state.residents.get(f)
                job.ready = r.ready_at if r is not None and r.ready_at > now else 0.0
            job.copy_s = copy_s
            job.defer_until = defer_deadline(due, ex_new, copy_s) if shedding else 0.0
            d.tickets.append(job)
            in_system += 1
            enter_stage(d, job, now)
            return True

        def try_place(rid: int, f: int, arrival: float, now: float) -> bool:
            nonlocal seq, swaps, peers, moved, evictions, unserved, misses
            snap.now = now
            self.xfer.now = now
            if edf:
                # Work ahead of this request, and its place in each queue: `admission.work_ahead`,
                # the server's own rule (torpor.runtime.placer). The simulator knows when the running
                # batch ends, and when the request's own model would land on each device (it
                # holds the device until then once it runs).
                due = arrival + fn_model[f].slo_s
                ex_new = cost.exec_seconds(f)
                # How much later each copy in flight may land before a request misses its
                # deadline: the request waiting on it, or any queued behind that one on the same
                # device (a request already past its deadline has nothing left to protect).
                slack = self.xfer.slack
                slack.clear()
                ends: list | None = [] if self.xfer.shared else None

                for d in devs:
                    free = d.busy_until if d.running else now
                    if d.running and d.cur_res is not None and d.cur_res.eta is not None:
                        free = max(d.exec_end, d.cur_res.expected())

                    def own_ready(d: _Dev = d) -> float:
                        # a host copy, the slowest it may get
                        r = d.state.residents.get(f)
                        if r is not None:
                            return r.expected()
                        hp = self.links.host_path(d.state.name)
                        return now + cost.copy_plan(models[f].nbytes, 0, hp, self.inflight,
                                                    snap.inflight_bytes, snap.clear_in(hp))[1]

                    if ends is not None:
                        ends.clear()
                    backlog, d.next_key, _ = work_ahead(d.queue, now, due, ex_new, 0, free_at=free,
                                                       own_ready=own_ready, ends=ends)
                    d.state.backlog_s = max(0.0, backlog)
                    if ends is None:
                        continue
                    least = math.inf  # protect every copy a request waits on, latest first
                    for r, t, deadline in reversed([*([(d.cur_res, free, d.cur_deadline)] if d.running and d.cur_res
                                                       is not None else []),
                                                    *((j.resident, t, j.due) for j, t in ends)]):
                        if t <= deadline:
                            least = min(least, deadline - t)
                        if r.ready_at > now and least < slack.get(id(r), math.inf):
                            slack[id(r)] = least
            else:
                for d in devs:
                    d.state.backlog_s = max(0.0, d.proj_end - now)
            dec = sched.place(models[f], snap)
            if dec is None:
                return False
            o = dec.option
            if o is None:
                unserved += 1
                misses += 1
                return True
            actions[o.action] = actions.get(o.action, 0) + 1
            d = by_name[o.device]
            if o.action in ("swap", "peer"):
                for v in o.evict:
                    self._evict(d, v)
                    evictions += 1
                # the first group moves at the share the copy starts with (it lands in well
                # under a millisecond; re-rating it is not worth the events); a copy waiting
                # for its path to clear moves it at full bandwidth once it starts
                if o.start_s > 0:
                    first = o.start_s + cost.nominal_seconds(models[f].first_group_bytes, o.path)
                else:
                    first = cost.transfer_seconds(models[f].first_group_bytes, o.path, self.inflight)
                r = self._add_resident(d, f, now + first, now + o.transfer_s)
                src = by_name[o.source].state.residents[f] if o.action == "peer" else None
                _, moved_trs = self.xfer.start(now, models[f].nbytes, o.path, (d, r, src),
                                               begin=now + o.start_s if o.start_s > 0 else None)
                rerated(moved_trs, now)
                if o.start_s > 0 and self.xfer.shared:
                    heapq.heappush(heap, (now + o.start_s, seq, _BEGIN, moved_trs[0]))
                    seq += 1
                moved += o.bytes_moved
                if o.action == "peer":
                    peers += 1
                else:
                    swaps += 1
            else:
                r = d.state.residents[f]
            r.pins += 1
            r.last_used = now
            spec = fn_model[f]
            same = d.queued_fn.get(f, 0)
            # what this request adds to the device's work: a whole run, or one more member of a
            # batch already queued there
            if spec.max_batch > 1 and same % spec.max_batch:
                est = cost.exec_seconds(f) * spec.batch_scale
            else:
                est = cost.exec_seconds(f)
            predicted[rid] = now - arrival + o.completion_s
            action_of[rid] = _ACTION_CODE[o.action]
            first_at = self.first_at.get((d.state.name, f), 0.0)
            job = _Job(rid, f, arrival, est, r, dec.meets_slo, now, first_at, arrival + spec.slo_s)
            if edf:
                # A request predicted to miss its SLO wherever it goes queues behind every one
                # that can still meet its own (among themselves by deadline): under overload,
                # serving the hopeless first only makes the next ones late too.
                job.key = d.next_key if not hopeless(dec) else d.next_key + HOPELESS_DELAY_S
                job.guard = arrival + spec.slo_s * sched.slo_margin
                bisect.insort(d.queue, job, key=_order)
            else:
                d.queue.append(job)
            d.queued_fn[f] = same + 1
            d.proj_end = max(max(d.proj_end, now, first_at) + est, r.ready_at)
            start_next(d, now)
            return True

        place = admit if staged else try_place

        def handle(ev: tuple) -> None:
            nonlocal seq, misses
            t, _, kind, data = ev
            if kind == _LANDED:
                tr, version = data
                if version == tr.version:
                    tr.owner[1].ready_at = t
                    tr.owner[1].eta = None
                    rerated(self.xfer.finish(tr, t), t)
                return
            if kind == _BEGIN:
                if not data.pending:
                    return
                # a copy that waited for its path starts as planned, unless copies started
                # since then still move there and it would slow one past the deadline of a
                # request waiting on it: then it waits until they have landed
                clear = self.xfer.busy_until(data.path, t) if self.xfer.would_harm(data, t) else t
                if clear > t + 1e-6:
                    rerated(self.xfer.postpone(data, clear), t)
                    heapq.heappush(heap, (clear, seq, _BEGIN, data))
                    seq += 1
                    return
                rerated(self.xfer.activate(data, t), t)
                return
            if kind == _WAKE:
                if data.hold_until == t:
                    data.hold_until = -1.0
                    start_next(data, t)
                return
            if kind == _COPIED:  # staging: a device's copy landed
                d, path = data
                for lk in path:
                    self.inflight[lk] -= 1
                retry_memory(d, t)
                return
            if kind == _STAGE:  # staging: a deferral ran out
                if data.wake_at == t:
                    data.wake_at = math.inf
                    grant(data, t)
                return
            if kind == _RELEASE:
                release(*data, t)
                return
            d, batch, ex, tok = data
            if tok != d.tok:
                return  # its copy's landing moved, and the completion with it
            d.busy_s += t - d.run_start
            d.cur_res = None
            if d.cur_hit or not staged:  # the server learns only from runs that found their model landed
                cost.observe_exec(batch[0].fn, ex, len(batch))
            d.running = False
            if staged and staging.release_s > 0:
                heapq.heappush(heap, (t + staging.release_s, seq, _RELEASE, (d, batch)))
                seq += 1
                start_next(d, t)  # the worker goes on with what is staged
                return
            release(d, batch, t)

        def release(d: _Dev, batch: list, t: float) -> None:
            # answered; the model unpinned; with staging, their stages given back
            # (torpor.runtime.residency.Placement._release), the next staged
            nonlocal misses
            for job in batch:
                latency[job.rid] = t - job.arrival
                if t - job.arrival > fn_model[job.fn].slo_s:
                    misses += 1
            r = batch[0].resident
            r.pins -= len(batch)
            r.last_used = t
            if staged:
                for job in batch:
                    finish(d, job)
                    d.holders.remove(job)
                retry_memory(d, t)
                grant(d, t)
            start_next(d, t)
            # Waiting requests retry in arrival order, a few per completion (a completion frees
            # at most one pin; rescanning a long backlog each time would be quadratic).
            for _ in range(min(len(pending), _RETRIES)):
                rid, f, arr = pending[0]
                if not place(rid, f, arr, t):
                    break
                pending.popleft()

        for i in range(n_req):
            t = float(arrivals_t[i])
            while heap and heap[0][0] <= t:
                handle(heapq.heappop(heap))
            f = int(arrivals_fn[i])
            rates[f].hit(t)
            if max_outstanding is not None and in_system + len(pending) >= max_outstanding:
                status[i] = DROPPED
                dropped += 1
                misses += 1
                continue
            # Torpor: a request that can be placed now is not held behind one waiting for room
            # (under overload every device can be full of models pinned by queued requests)
            if (pending and not edf) or not place(i, f, t, t):
                waits += 1
                pending.append((i, f, t))
            if misses > allowed:
                stopped = True
                break
        while heap and not stopped:
            handle(heapq.heappop(heap))
            if misses > allowed:
                stopped = True

        slo = np.array([fn_model[int(f)].slo_s for f in arrivals_fn]) if n_req else np.zeros(0)
        ok = latency <= slo
        served = latency[np.isfinite(latency)]
        # per-function compliance at p98, as the paper counts it
        compliant = total_fns = 0
        if n_req:
            order = np.argsort(arrivals_fn, kind="stable")
            fns_sorted = arrivals_fn[order]
            bounds = np.flatnonzero(np.diff(fns_sorted)) + 1
            for grp in np.split(order, bounds):
                total_fns += 1
                lat = latency[grp]
                p98 = np.inf if not np.all(np.isfinite(lat)) else float(np.percentile(lat, 98))
                compliant += p98 <= fn_model[int(arrivals_fn[grp[0]])].slo_s
        span = max(duration, float(max((d.busy_until for d in devs), default=0.0)))
        return SimResult(
            policy=self.policy,
            gpus=self.n,
            requests=n_req,
            served=int(served.size),
            unserved=unserved,
            attainment=(1.0 - misses / n_req if stopped else float(ok.mean())) if n_req else 1.0,
            compliant_functions=compliant / total_fns if total_fns else 1.0,
            p50_ms=float(np.percentile(served, 50) * 1e3) if served.size else math.nan,
            p99_ms=float(np.percentile(served, 99) * 1e3) if served.size else math.nan,
            swaps=swaps,
            peer_copies=peers,
            bytes_moved=moved,
            evictions=evictions,
            gpu_busy=sum(d.busy_s for d in devs) / (self.n * span) if span else 0.0,
            waits=waits,
            wall_s=time.perf_counter() - t_wall,
            duration_s=duration,
            latency_pct_ms=[None if not math.isfinite(x) else round(x * 1e3, 3)
                            for x in (np.percentile(latency, LATENCY_PCTS, method="lower") if n_req and not stopped
                                      else [])],
            batches=sum(d.batches for d in devs),
            mean_batch=sum(d.batched for d in devs) / max(1, sum(d.batches for d in devs)),
            actions=actions,
            stopped=stopped,
            shed_arrival=shed_arrival,
            shed_queued=shed_queued,
            dropped=dropped,
        )
