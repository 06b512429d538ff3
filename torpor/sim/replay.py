"""One run of a `torpor.sim.simulation.Simulation` over its arrivals (`Replay`): the event loop
and the handlers it calls (an arrival, a copy landing, a copy that waited for its path
starting, a short batch's wait for more requests running out, a run ending), a device
starting its next batch, the placement of a request at arrival, and the run's `SimResult`.

Here a request takes memory and starts its copy when it is placed, and nothing is shed: the
simulator's original model, the one the README's simulator numbers were measured with. The
server's admission (`Staging`) is `torpor.sim.staged.StagedReplay`, which places, stages and
releases requests as the server does and otherwise runs this loop.
"""

from __future__ import annotations

import bisect
import heapq
import inspect
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from torpor.scheduling.admission import work_ahead
from torpor.scheduling.scheduler import HOPELESS_DELAY_S, hopeless
from torpor.sim.physics import Compute
from torpor.sim.state import (
    _ACTION_CODE,
    _BEGIN,
    _DONE,
    _LANDED,
    _RETRIES,
    _WAKE,
    DROPPED,
    LATENCY_PCTS,
    SimResult,
    _Dev,
    _Job,
    _order,
)

if TYPE_CHECKING:  # for annotations only: simulation imports this module
    from torpor.sim.simulation import Simulation


class Replay:
    """The arrivals replayed through `sim` (its devices, cost model, scheduler and links,
    which the run changes). Per request afterwards, on `sim` as well: `latency`
    (inf: not answered), `status` (ANSWERED, SHED_ARRIVAL, ...), the scheduler's `predicted`
    latency and chosen action (`action_of`)."""

    staged = False  # the server's admission (`torpor.sim.staged.StagedReplay`)

    def __init__(self, sim: Simulation, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float, *,
                 stop_below: float | None = None, max_outstanding: int | None = None):
        self.sim = sim
        self.arrivals_t, self.arrivals_fn, self.duration = arrivals_t, arrivals_fn, duration
        self.max_outstanding = max_outstanding
        sc = sim.sc
        rng = np.random.default_rng(sc.seed + 1)
        self.noise = (rng.lognormal(0.0, sc.exec_noise, size=len(arrivals_t)) if sc.exec_noise
                      else np.ones(len(arrivals_t)))
        # the error model (`torpor.sim.errors`): per request, the link-time factor of the copy its
        # placement starts and its run's execution factor (None: exactly 1); compute slowed by
        # copies moving into the device
        self.copy_x, self.run_x = sim.errors.draws(len(arrivals_t), sc.seed)
        slow = sim.errors.copy_slowdown
        for d in sim.devs:
            d.compute = Compute(slow) if slow != 1 else None
        # each copy's true landing while it is in flight (the scheduler sees `ready_at`, its belief),
        # and its resident
        self.lands: dict[int, float] = {}
        self.flying: dict[int, Any] = {}
        # what the scheduler's cost model learns from a landed copy, where it can
        obs = getattr(sim.cost, "observe_copy", None)
        self.observe_copy = obs
        self.copy_predicted = obs is not None and "predicted_s" in inspect.signature(obs).parameters
        if sim.policy == "static":
            sim.prepare_static(arrivals_fn, duration)
        self.n_req = n_req = len(arrivals_t)
        sim.latency = self.latency = np.full(n_req, np.inf)
        # per request, for diagnosis: the scheduler's predicted latency and chosen action
        sim.predicted = self.predicted = np.full(n_req, np.nan)
        sim.action_of = self.action_of = np.zeros(n_req, dtype=np.int8)
        sim.status = self.status = np.zeros(n_req, dtype=np.int8)
        sim.copies = self.copies = []  # staging: (issued, request, starts, lands)
        # staging: when each request held its stage and its model (the engine's compute_infer
        # counts from then: the wait for the device and for its copy, and its run)
        sim.acquired = self.acquired = np.full(n_req, np.nan)
        # staging with shedding: why each shed request was shed, as the server's
        # `torpor_requests_shed` labels it ("arrival:late", "queued:harms", ...)
        sim.shed_why = self.shed_why = {}
        # requests let through as probes (admission.probe), per function, as the placer counts them
        sim.probes = self.probes = {}
        self.heap: list = []
        self.seq = 0
        self.pending: deque = deque()  # requests that found no room, in arrival order
        self.swaps = self.peers = self.moved = self.evictions = self.waits = self.unserved = 0
        self.shed_arrival = self.shed_queued = self.dropped = self.in_system = 0
        self.actions: dict[str, int] = {}
        self.misses = 0
        self.allowed = math.inf if stop_below is None else (1.0 - stop_below) * n_req
        self.stopped = False
        self.snap, self.sched, self.cost = sim.snap, sim.scheduler, sim.cost
        self.devs, self.by_name = sim.devs, sim.by_name
        self.fn_model, self.models, self.rates = sim.fn_model, sim.models, sim.rates
        self.last_run: dict[int, float] = {}  # function -> when one of its runs last ended (admission.probe)
        self.last_probe: dict[int, float] = {}
        self.xfer = sim.xfer
        self.edf = sim.queue_order == "deadline"
        # processor sharing: Torpor's scheduler sees when each copy should land if no other joins
        # (`ResidentState.eta`), not the landing at the rate it has now
        self.etas = self.edf and self.xfer.shared and not self.staged
        self.listq = self.edf or self.staged  # queues kept sorted by (key, seq) in a list
        if self.listq:
            for d in self.devs:
                d.queue = []
        self.handlers = {_DONE: self.on_done, _LANDED: self.on_landed, _BEGIN: self.on_begin, _WAKE: self.on_wake}

    # ---- the event loop ------------------------------------------------------------------------
    def push(self, at: float, kind: int, data: Any) -> None:
        heapq.heappush(self.heap, (at, self.seq, kind, data))
        self.seq += 1

    def replay(self) -> None:
        """Every arrival in order, each after the events due by then; then the events left
        (or up to `stop_below`'s limit on missed requests)."""
        heap = self.heap
        for i in range(self.n_req):
            t = float(self.arrivals_t[i])
            while heap and heap[0][0] <= t:
                self.handle(heapq.heappop(heap))
            self.arrive(i, int(self.arrivals_fn[i]), t)
            if self.misses > self.allowed:
                self.stopped = True
                break
        while heap and not self.stopped:
            self.handle(heapq.heappop(heap))
            if self.misses > self.allowed:
                self.stopped = True

    def handle(self, ev: tuple) -> None:
        t, _, kind, data = ev
        self.handlers[kind](t, data)

    def arrive(self, i: int, f: int, t: float) -> None:
        if self.max_outstanding is not None and self.in_system + len(self.pending) >= self.max_outstanding:
            self.status[i] = DROPPED  # the client did not send it: the server never sees it
            self.dropped += 1
            self.misses += 1
            return
        self.rates[f].hit(t)  # every request that reaches the server counts, shed or not (DevicePool.arrived)
        # Torpor: a request that can be placed now is not held behind one waiting for room
        # (under overload every device can be full of models pinned by queued requests)
        if (self.pending and not self.edf) or not self.place(i, f, t, t):
            self.waits += 1
            self.pending.append((i, f, t))

    # ---- events ----------------------------------------------------------------------------------
    def on_landed(self, t: float, data: Any) -> None:
        tr, version = data
        if version == tr.version:
            r = tr.owner[1]
            r.ready_at = t  # it has landed: the scheduler sees that
            r.eta = None
            self.lands.pop(id(r), None)
            self.flying.pop(id(r), None)
            self.rerated(self.xfer.finish(tr, t), t)
            self.copy_landed(tr.path, tr.nbytes, t - tr.began, tr.plan)
            self.copies_into(tr.owner[0], t, -1)

    def copy_landed(self, path: tuple, nbytes: int, seconds: float, plan: float | None) -> None:
        """The scheduler's cost model measures a landed copy, where it can (`observe_copy`)."""
        obs = self.observe_copy
        if obs is None:
            return
        if self.copy_predicted:
            obs(path, nbytes, seconds, predicted_s=plan)
        else:
            obs(path, nbytes, seconds)

    def copies_into(self, d: _Dev, now: float, delta: int) -> None:
        """A copy into `d` started moving (+1) or landed (-1): its running compute re-planned
        where copies slow it (`torpor.sim.physics.Compute`)."""
        c = d.compute
        if c is None or not c.copies(now, delta) or not d.running:
            return
        d.exec_end = c.end
        r = d.cur_res
        done = max(c.end, self.lands.get(id(r), r.ready_at))
        if done != d.busy_until:
            d.busy_until = done
            d.tok += 1
            batch, ex = d.cur_batch
            self.push(done, _DONE, (d, batch, ex, d.tok))

    def on_begin(self, t: float, tr: Any) -> None:
        if not tr.pending:
            return
        # a copy that waited for its path starts as planned, unless copies started since then
        # still move there and it would slow one past the deadline of a request waiting on it:
        # then it waits until they have landed
        # (fixed shares: it takes the share a copy starting now gets, and slows nobody)
        xfer = self.xfer
        if xfer.shared:
            clear = xfer.busy_until(tr.path, t) if xfer.would_harm(tr, t) else t
            if clear > t + 1e-6:
                self.rerated(xfer.postpone(tr, clear), t)
                self.push(clear, _BEGIN, tr)
                return
        self.rerated(xfer.activate(tr, t), t)
        self.copies_into(tr.owner[0], t, 1)

    def on_wake(self, t: float, d: _Dev) -> None:
        if d.hold_until == t:
            d.hold_until = -1.0
            self.start_next(d, t)

    def on_done(self, t: float, data: Any) -> None:
        d, batch, ex, tok = data
        if tok != d.tok:
            return  # its copy's landing moved, and the completion with it
        d.busy_s += t - d.run_start
        self.last_run[batch[0].fn] = t
        d.cur_res = None
        if d.compute is not None:
            ex = d.compute.stop()  # its compute, as measured
        if self.learns_from(d):
            self.cost.observe_exec(batch[0].fn, ex, len(batch))
        d.running = False
        self.after_run(d, batch, t)

    def learns_from(self, d: _Dev) -> bool:
        """Whether the cost model learns from the run that just ended on `d`."""
        return True

    def after_run(self, d: _Dev, batch: list, t: float) -> None:
        """A run ended: its requests are answered at once."""
        self.release(d, batch, t)

    def release(self, d: _Dev, batch: list, t: float) -> None:
        # answered; the model unpinned; the device's next batch; then requests waiting for room
        latency, fn_model = self.latency, self.fn_model
        for job in batch:
            for rid, arrival in ((job.rid, job.arrival), *job.riders):
                latency[rid] = t - arrival
                if t - arrival > fn_model[job.fn].slo_s:
                    self.misses += 1
        r = batch[0].resident
        r.pins -= len(batch)
        r.last_used = t
        self.released(d, batch, t)
        self.start_next(d, t)
        # Waiting requests retry in arrival order, a few per completion (a completion frees at
        # most one pin; rescanning a long backlog each time would be quadratic).
        pending = self.pending
        for _ in range(min(len(pending), _RETRIES)):
            rid, f, arr = pending[0]
            if not self.place(rid, f, arr, t):
                break
            pending.popleft()

    def released(self, d: _Dev, batch: list, t: float) -> None:
        """What else answering `batch` gives back (the server's stages: `StagedReplay`)."""

    # ---- devices ---------------------------------------------------------------------------------
    def start_next(self, d: _Dev, now: float) -> None:
        if d.running or not d.queue:
            return
        head: _Job = d.queue[0]
        f = head.fn
        spec = self.fn_model[f]
        same = d.queued_fn.get(f, 0)
        if spec.max_batch > 1 and same < spec.max_batch and spec.max_queue_delay_s > 0:
            # dynamic batching: a short batch waits for more requests up to the queue delay
            hold = head.enqueued + spec.max_queue_delay_s
            if now < hold:
                if d.hold_until != hold:
                    d.hold_until = hold
                    self.push(hold, _WAKE, d)
                return
        if self.listq:
            d.queue.pop(0)
        else:
            d.queue.popleft()
        batch = [head]
        if spec.max_batch > 1 and same > 1:
            # requests of one model function anywhere in the queue join the head's batch
            # (Triton's dynamic batcher); the rest keep their order
            keep = []
            rows = 1 + len(head.riders)
            for j in d.queue:
                if j.fn == f and rows + 1 + len(j.riders) <= spec.max_batch:
                    batch.append(j)
                    rows += 1 + len(j.riders)
                else:
                    keep.append(j)
            d.queue = keep if self.listq else deque(keep)
        d.queued_fn[f] = same - len(batch)
        if d.open_batch.get(f) in batch:  # it runs now: later requests open a batch of their own
            del d.open_batch[f]
        b = len(batch) + sum(len(j.riders) for j in batch)
        r = head.resident
        begin = max(now, self.sim.first_at.get((d.state.name, f), 0.0))
        ex = spec.exec_seconds(b) * self.noise[head.rid]  # as the scheduler sees the run
        work = ex if self.run_x is None else ex * self.run_x[head.rid]  # its true compute
        exec_end = begin + work if d.compute is None else d.compute.start(now, begin, work)
        landed = self.lands.get(id(r), r.ready_at)  # its copy's true landing
        done = max(exec_end, landed)
        d.compute_s += exec_end - begin
        d.copy_wait_s += done - now - (exec_end - begin)
        d.running = True
        d.busy_until = done
        d.run_start = now
        d.exec_end = exec_end
        d.bexec_end = begin + ex
        d.cur_res = r
        d.cur_batch = (batch, work)
        d.cur_deadline = min(j.due for j in batch)
        d.cur_hit = landed <= now
        for j in batch:
            j.started_at = now
        d.tok += 1
        d.batches += 1
        d.batched += b
        if not self.edf:  # re-anchor the projection of queued work on this batch's end (as the scheduler sees it)
            t_end = max(d.bexec_end, r.ready_at)
            for j in d.queue:
                t_end = max(max(t_end, j.first_at) + j.estimate, j.resident.ready_at)
            d.proj_end = t_end
        self.push(done, _DONE, (d, batch, work, d.tok))

    def rerated(self, trs: list, now: float) -> None:
        # copies whose landing moved: their residents, locks, events and any run waiting on them
        for tr in trs:
            d, r, src = tr.owner
            r.ready_at = tr.bend  # what the scheduler sees; the truth drives the events
            self.lands[id(r)] = tr.end
            self.flying[id(r)] = r
            if self.etas:
                r.eta = self.xfer.eta(tr, now)
            if src is not None:
                src.locked_until = max(src.locked_until, tr.end)
            self.push(tr.end, _LANDED, (tr, tr.version))
            if d.running and d.cur_res is r:
                done = max(d.exec_end, tr.end)
                if done != d.busy_until:
                    d.busy_until = done
                    d.tok += 1
                    batch, ex = d.cur_batch
                    self.push(done, _DONE, (d, batch, ex, d.tok))

    # ---- placement at arrival --------------------------------------------------------------------
    def late_copies(self, now: float) -> None:
        """As the server's placer shows them (`Placer.snapshot`): a copy later than the
        scheduler's plan (`ready_at`, its landing at the believed rates) has not landed, so it
        is not ready now whatever the plan said; it shows as landing one copy latency from now.
        Without error the plan is never late (the rates only change when the copy is re-rated);
        `eta`, the landing if no copy joins, can be, and is left to the scheduler."""
        soon = now + self.cost.transfer_latency_s
        for r in self.flying.values():
            if r.ready_at < now:
                r.ready_at = soon
                r.eta = None

    def project(self, f: int, arrival: float, now: float) -> None:
        """Tell the scheduler the work ahead of a request for `f` on each device
        (`DeviceState.backlog_s`) and, under deadline order, its place in each queue."""
        sim, devs = self.sim, self.devs
        if not self.edf:
            for d in devs:
                d.state.backlog_s = max(0.0, d.proj_end - now)
            return
        # Work ahead of this request, and its place in each queue: `admission.work_ahead`, the
        # server's own rule (torpor.runtime.placer). The simulator knows when the running batch
        # ends, and when the request's own model would land on each device (it holds the
        # device until then once it runs).
        cost, snap, models = self.cost, self.snap, self.models
        due = arrival + self.fn_model[f].slo_s
        ex_new = cost.exec_seconds(f)
        # How much later each copy in flight may land before a request misses its deadline:
        # the request waiting on it, or any queued behind that one on the same device (a
        # request already past its deadline has nothing left to protect).
        slack = self.xfer.slack
        slack.clear()
        ends: list | None = [] if self.xfer.shared else None

        for d in devs:
            free = now  # when the running batch should end, as the scheduler sees it
            if d.running and d.cur_res is not None:
                r = d.cur_res
                free = max(d.bexec_end, r.ready_at if r.eta is None else r.expected())

            def own_ready(d: _Dev = d) -> float:
                # a host copy, the slowest it may get
                r = d.state.residents.get(f)
                if r is not None:
                    return r.expected()
                hp = sim.links.host_path(d.state.name)
                return now + cost.copy_plan(models[f].nbytes, 0, hp, sim.inflight,
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

    def place(self, rid: int, f: int, arrival: float, now: float) -> bool:
        """Place request `rid` (for `f`, arrived at `arrival`) now: the scheduler's decision,
        its copy started, the request in the device's queue. False: no device has room (it
        waits in `pending`)."""
        sim, cost, models = self.sim, self.cost, self.models
        self.snap.now = now
        self.xfer.now = now
        self.late_copies(now)
        self.project(f, arrival, now)
        dec = self.sched.place(models[f], self.snap)
        if dec is None:
            return False
        o = dec.option
        if o is None:
            self.unserved += 1
            self.misses += 1
            return True
        self.actions[o.action] = self.actions.get(o.action, 0) + 1
        d = self.by_name[o.device]
        if o.action in ("swap", "peer"):
            r = self.start_copy(d, f, dec, now, rid)
        else:
            r = d.state.residents[f]
        r.pins += 1
        r.last_used = now
        spec = self.fn_model[f]
        same = d.queued_fn.get(f, 0)
        # what this request adds to the device's work: a whole run, or one more member of a
        # batch already queued there
        if spec.max_batch > 1 and same % spec.max_batch:
            est = cost.exec_seconds(f) * spec.batch_scale
        else:
            est = cost.exec_seconds(f)
        self.predicted[rid] = now - arrival + o.completion_s
        self.action_of[rid] = _ACTION_CODE[o.action]
        first_at = sim.first_at.get((d.state.name, f), 0.0)
        job = _Job(rid, f, arrival, est, r, dec.meets_slo, now, first_at, arrival + spec.slo_s)
        if self.edf:
            # A request predicted to miss its SLO wherever it goes queues behind every one that
            # can still meet its own (among themselves by deadline): under overload, serving
            # the hopeless first only makes the next ones late too.
            job.key = d.next_key if not hopeless(dec) else d.next_key + HOPELESS_DELAY_S
            job.guard = arrival + spec.slo_s * self.sched.slo_margin
            bisect.insort(d.queue, job, key=_order)
        else:
            d.queue.append(job)
        d.queued_fn[f] = same + 1
        d.proj_end = max(max(d.proj_end, now, first_at) + est, r.ready_at)
        self.start_next(d, now)
        return True

    def start_copy(self, d: _Dev, f: int, dec: Any, now: float, rid: int) -> Any:
        """The decision's evictions on `d` and its copy of `f` (for request `rid`) started; the
        new resident."""
        sim, models, o = self.sim, self.models, dec.option
        for v in o.evict:
            sim.evict(d, v)
            self.evictions += 1
        scale = 1.0 if self.copy_x is None else float(self.copy_x[rid])  # its jitter
        # the first group moves at the share the copy starts with (it lands in well under a
        # millisecond; re-rating it is not worth the events); a copy waiting for its path to
        # clear moves it at full bandwidth once it starts; at the true bandwidths
        tcost, first_b = sim.true_cost, models[f].first_group_bytes * scale
        if o.start_s > 0:
            first = o.start_s + tcost.nominal_seconds(first_b, o.path)
        else:
            first = tcost.transfer_seconds(first_b, o.path, sim.inflight)
        r = sim.add_resident(d, f, now + first, now + o.transfer_s)
        src = self.by_name[o.source].state.residents[f] if o.action == "peer" else None
        tr, moved_trs = self.xfer.start(now, models[f].nbytes, o.path, (d, r, src),
                                        begin=now + o.start_s if o.start_s > 0 else None, scale=scale)
        tr.plan = o.transfer_s - o.start_s
        self.rerated(moved_trs, now)
        if o.start_s > 0:
            self.push(now + o.start_s, _BEGIN, tr)
        else:
            self.copies_into(d, now, 1)
        self.moved += o.bytes_moved
        if o.action == "peer":
            self.peers += 1
        else:
            self.swaps += 1
        return r

    # ---- the result ------------------------------------------------------------------------------
    def result(self, wall_s: float) -> SimResult:
        sim, arrivals_fn, latency, fn_model = self.sim, self.arrivals_fn, self.latency, self.fn_model
        n_req, devs, stopped = self.n_req, self.devs, self.stopped
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
        span = max(self.duration, float(max((d.busy_until for d in devs), default=0.0)))
        return SimResult(
            policy=sim.policy,
            gpus=sim.n,
            requests=n_req,
            served=int(served.size),
            unserved=self.unserved,
            attainment=(1.0 - self.misses / n_req if stopped else float(ok.mean())) if n_req else 1.0,
            compliant_functions=compliant / total_fns if total_fns else 1.0,
            p50_ms=float(np.percentile(served, 50) * 1e3) if served.size else math.nan,
            p99_ms=float(np.percentile(served, 99) * 1e3) if served.size else math.nan,
            swaps=self.swaps,
            peer_copies=self.peers,
            bytes_moved=self.moved,
            evictions=self.evictions,
            gpu_busy=sum(d.busy_s for d in devs) / (sim.n * span) if span else 0.0,
            waits=self.waits,
            wall_s=wall_s,
            duration_s=self.duration,
            latency_pct_ms=[None if not math.isfinite(x) else round(x * 1e3, 3)
                            for x in (np.percentile(latency, LATENCY_PCTS, method="lower") if n_req and not stopped
                                      else [])],
            batches=sum(d.batches for d in devs),
            mean_batch=sum(d.batched for d in devs) / max(1, sum(d.batches for d in devs)),
            actions=self.actions,
            stopped=stopped,
            shed_arrival=self.shed_arrival,
            shed_queued=self.shed_queued,
            dropped=self.dropped,
        )
