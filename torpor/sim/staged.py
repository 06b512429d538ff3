"""The server's admission on virtual time (`StagedReplay`, a `Simulation` with `Staging`): a
request is placed as the engine places it (`torpor.runtime.placer`'s snapshot, shedding at
arrival), waits for one of its device's stages (`torpor.runtime.staging.StagingQueue`), and
only a staged request pins its model, evicts and starts its copy
(`torpor.runtime.residency`); copies to one device go one at a time at the path's full rate.
The rules are `torpor.scheduling.admission`'s, the code the server runs; the event loop, the
devices' runs and the result are `torpor.sim.replay.Replay`'s.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from torpor.scheduling.admission import (
    FREE,
    HARMS,
    defer_deadline,
    deferred,
    expires_at,
    harm_level,
    outlasted,
    planned_residents,
    probe,
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
from torpor.scheduling.eviction import Candidate
from torpor.scheduling.scheduler import HOPELESS_DELAY_S, ModelInfo, ResidentState, hopeless
from torpor.sim.replay import Replay
from torpor.sim.state import (
    _ACTION_CODE,
    _COPIED,
    _EXPIRE,
    _MOVING,
    _RELEASE,
    _STAGE,
    SHED_ARRIVAL,
    SHED_QUEUED,
    UNSERVED,
    _defer_until,
    _Dev,
    _Job,
    _order,
)

if TYPE_CHECKING:  # for annotations only: simulation imports this module
    from torpor.sim.simulation import Simulation


class StagedReplay(Replay):
    """`Replay` with the server's admission (`sim.staging`, a `Staging`)."""

    staged = True

    def __init__(self, sim: Simulation, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float, **kw: Any):
        super().__init__(sim, arrivals_t, arrivals_fn, duration, **kw)
        self.staging = staging = sim.staging
        self.permits = 1 + staging.lookahead  # one execution at a time per device
        self.shedding = staging.shed
        self.evict_policy = self.sched.eviction
        self.handlers.update({_COPIED: self.on_copied, _STAGE: self.on_stage_timer, _RELEASE: self.on_release,
                              _MOVING: self.on_moving, _EXPIRE: self.on_expire})

    def size_of(self, f: int) -> int:
        return self.models[f].nbytes

    # ---- events ----------------------------------------------------------------------------------
    def on_copied(self, t: float, data: Any) -> None:
        d, path, r, began, plan = data  # a device's copy landed
        for lk in path:
            self.sim.inflight[lk] -= 1
        self.flying.pop(id(r), None)
        if self.lands.pop(id(r), None) is not None:
            r.ready_at = t  # the scheduler sees it landed
        self.copy_landed(path, r.nbytes, t - began, plan)
        self.copies_into(d, t, -1)
        self.retry_memory(d, t)

    def on_moving(self, t: float, d: _Dev) -> None:
        self.copies_into(d, t, 1)

    def on_stage_timer(self, t: float, d: _Dev) -> None:
        if d.wake_at == t:  # a deferral ran out
            d.wake_at = math.inf
            self.grant(d, t)

    def on_expire(self, t: float, data: Any) -> None:
        # still waiting at the last moment it could be staged and be on time: refused now
        # (torpor.runtime.residency: StageExpired, then the device path's last look)
        d, job = data
        i = bisect.bisect_left(d.waiting, _order(job), key=_order)  # (key, seq): one job's own
        if i == len(d.waiting) or d.waiting[i] is not job:
            return  # staged (or refused) before then
        d.waiting.pop(i)
        self.want(d, job, -1)
        self.refuse_queued(d, job, "late")
        self.grant(d, t)

    def on_release(self, t: float, data: Any) -> None:
        self.release(*data, t)

    def learns_from(self, d: _Dev) -> bool:
        # the server learns only from runs that found their model landed
        return d.cur_hit

    def after_run(self, d: _Dev, batch: list, t: float) -> None:
        # the server acts on a finished run `release_s` later; the worker goes on with what is staged
        if self.staging.release_s > 0:
            self.push(t + self.staging.release_s, _RELEASE, (d, batch))
            self.start_next(d, t)
            return
        self.release(d, batch, t)

    def released(self, d: _Dev, batch: list, t: float) -> None:
        # their stages given back (torpor.runtime.residency.Placement._release), the next staged
        for job in batch:
            self.in_system -= len(job.riders)
            self.finish(d, job)
            d.holders.remove(job)
        self.retry_memory(d, t)
        self.grant(d, t)

    # ---- stages ----------------------------------------------------------------------------------
    def candidates(self, d: _Dev, now: float, idle_only: bool) -> list[Candidate]:
        # the residents of `d` as the server's eviction sees them (torpor.runtime.memory.candidates)
        sim, rates = self.sim, self.rates
        bw = sim.links.bandwidth(sim.links.host_path(d.state.name)[0])
        return [Candidate(r.key, r.nbytes, r.last_used, rates[r.key].rate(now), r.nbytes / bw,
                          sim.holder_count.get(r.key, 1) - 1)
                for r in d.state.residents.values() if not idle_only or r.evictable(now)]

    def level(self, d: _Dev, f: int, now: float) -> int:
        # what staging f on d now does to requests with an objective waiting there
        # (torpor.runtime.residency's `_blocker`)
        res = d.state.residents
        need = self.models[f].nbytes - d.state.free_bytes
        if f in res or need <= 0:
            return FREE
        wanted = d.protected
        victims = ((c.key, c.nbytes) for c in victim_order(self.evict_policy, self.candidates(d, now, False),
                                                                    now, wanted))
        return harm_level(f, need, res, victims, wanted)

    def want(self, d: _Dev, job: _Job, n: int) -> None:
        for counts in (d.wanted, d.protected) if job.defer_until > 0 else (d.wanted,):
            c = counts.get(job.fn, 0) + n
            if c > 0:
                counts[job.fn] = c
            else:
                del counts[job.fn]

    def enter_stage(self, d: _Dev, job: _Job, now: float) -> None:
        # torpor.runtime.staging.StagingQueue.enter
        # (a request that waits is marked passed over where it would be deferred right away,
        # before it counts among those waiting: the tag)
        head = d.waiting[0].key if d.waiting else None
        at_once = stage_at_once(job.key, len(d.holders), self.permits, head, (h.key for h in d.holders))
        passed = deferred(now, job.defer_until, lambda: self.level(d, job.fn, now))
        if at_once and not passed:
            self.stage(d, job, now, stage_level(job.defer_until, lambda: self.level(d, job.fn, now)))
        else:
            bisect.insort(d.waiting, job, key=_order)
            job.passed = passed
            self.want(d, job, 1)
            if self.shedding and job.due < math.inf and not job.probe:
                self.push(expires_at(job.due, job.estimate), _EXPIRE, (d, job))
        self.grant(d, now)

    def grant(self, d: _Dev, now: float) -> None:
        # torpor.runtime.staging.StagingQueue._grant: the lowest waiting request not deferred,
        # while stages are free; a timer for when the first one passed over runs out of deferral
        i: int | None = 0
        while len(d.holders) < self.permits and d.waiting:
            start = i
            i, wake = stage_next(d.waiting, now, _defer_until, lambda j: self.level(d, j.fn, now), i)
            for j in d.waiting[start:i]:  # those it scanned past were deferred: passed over
                j.passed = True
            if wake < d.wake_at:
                d.wake_at = wake
                self.push(wake, _STAGE, d)
            if i is None:
                break
            job = d.waiting.pop(i)
            job.passed = False
            self.want(d, job, -1)
            self.stage(d, job, now, stage_level(job.defer_until, lambda j=job: self.level(d, j.fn, now)))

    def finish(self, d: _Dev, job: _Job) -> None:
        d.tickets.remove(job)
        self.in_system -= 1

    def stage(self, d: _Dev, job: _Job, now: float, lvl: int) -> None:
        # it holds a stage: a last look (the engine's on_stage), then memory, then the device's queue
        why = None
        if self.shedding and job.due < math.inf and not job.probe:
            lookahead = self.staging.lookahead
            why = shed_when_staged(now, job.estimate, job.copy_s, job.fn in d.state.residents, job.due, lvl,
                                   lambda: would_delay([k for k in d.tickets if k is not job], now,
                                                       job.estimate + job.copy_s, lookahead))
        if why is not None:
            self.refuse_queued(d, job, why)
            return
        d.holders.append(job)
        if not self.acquire(d, job, now):
            d.memwait.append(job)

    def refuse_queued(self, d: _Dev, job: _Job, why: str) -> None:
        for rid in (job.rid, *(r for r, _ in job.riders)):  # its batch's riders get its answer
            self.status[rid] = SHED_QUEUED
            self.shed_why[rid] = "queued:" + why
            self.shed_queued += 1
            self.misses += 1
        if d.open_batch.get(job.fn) is job:
            del d.open_batch[job.fn]
        self.in_system -= len(job.riders)
        self.finish(d, job)

    # ---- memory and copies -----------------------------------------------------------------------
    def acquire(self, d: _Dev, job: _Job, now: float) -> bool:
        # torpor.runtime.residency._acquire_staged: pin it where resident, else evict idle
        # residents (models others wait for last) and start its copy; False: no room yet
        sim = self.sim
        f = job.fn
        r = d.state.residents.get(f)
        if r is None:
            nbytes = self.models[f].nbytes
            if d.state.free_bytes < nbytes:
                for c in victim_order(self.evict_policy, self.candidates(d, now, True), now, d.wanted):
                    sim.evict(d, c.key)
                    self.evictions += 1
                    if d.state.free_bytes >= nbytes:
                        break
                else:
                    return False
            r = self.start_copy(d, f, job.rid, job.source, now)
        r.pins += 1
        r.last_used = now
        self.acquired[job.rid] = now
        for rid, _ in job.riders:
            self.acquired[rid] = now
        job.resident = r
        job.staged = True
        job.first_at = sim.first_at.get((d.state.name, f), 0.0)
        bisect.insort(d.queue, job, key=_order)
        d.queued_fn[f] = d.queued_fn.get(f, 0) + 1
        self.start_next(d, now)
        return True

    def start_copy(self, d: _Dev, f: int, rid: int, source: str | None, now: float) -> ResidentState:
        # one copy at a time per device, each at its path's full rate; from the peer device
        # `source` where it holds a landed copy and there is a path, else the host. It takes
        # its true time (`torpor.sim.errors`); the scheduler sees the time its cost model predicts
        sim, cost, tcost, models = self.sim, self.cost, self.sim.true_cost, self.models
        name = d.state.name
        path = sim.links.host_path(name)
        src = None
        if source is not None:
            s = self.by_name[source].state.residents.get(f)
            ppath = sim.links.peer_path(source, name)
            if s is not None and self.lands.get(id(s), s.ready_at) <= now and ppath is not None:
                src, path = s, ppath
        scale = 1.0 if self.copy_x is None else float(self.copy_x[rid])  # its jitter
        begin = max(now + self.staging.copy_delay_s, d.copy_free_at)
        full = begin + tcost.nominal_seconds(models[f].nbytes * scale, path)
        believed = begin + cost.nominal_seconds(models[f].nbytes, path)
        d.copy_free_at = full
        self.copies.append((now, rid, begin, full))
        r = sim.add_resident(d, f, begin + tcost.nominal_seconds(models[f].first_group_bytes * scale, path),
                             believed)
        self.lands[id(r)] = full
        self.flying[id(r)] = r
        if src is not None:
            src.locked_until = max(src.locked_until, full)
            self.peers += 1
        else:
            self.swaps += 1
        self.moved += models[f].nbytes
        clear = sim.link_clear_at
        for lk in path:
            sim.inflight[lk] = sim.inflight.get(lk, 0) + 1
            clear[lk] = max(clear.get(lk, -math.inf), believed)
        self.push(full, _COPIED, (d, path, r, begin, believed - begin))
        if d.compute is not None:
            if begin > now:
                self.push(begin, _MOVING, d)
            else:
                self.copies_into(d, now, 1)
        return r

    def retry_memory(self, d: _Dev, now: float) -> None:
        while d.memwait and self.acquire(d, d.memwait[0], now):
            d.memwait.pop(0)

    # ---- the way in ------------------------------------------------------------------------------
    def decide(self, f: int, arrival: float, now: float) -> Any:
        """The scheduler's decision for a request for `f` on the devices as the server's placer
        sees them (`torpor.runtime.placer`): the work queued ahead, when a new request would be
        staged, and the models queued requests will copy in."""
        sim, edf, lookahead = self.sim, self.edf, self.staging.lookahead
        self.snap.now = now
        self.late_copies(now)
        due = arrival + self.fn_model[f].slo_s
        ex_new = self.cost.exec_seconds(f)
        planned = []
        for d in self.devs:
            ends: list = []
            backlog, d.next_key, stage_in = work_ahead(d.tickets, now, due if edf else None, ex_new,
                                                       lookahead, ends=ends)
            d.state.backlog_s = max(0.0, backlog)
            d.state.stage_in_s = max(0.0, stage_in)
            d.state.queue_len = len(d.tickets)
            # as torpor.runtime.placer's snapshot: a model a queued request will copy in shows
            # as a resident landing by the time that request runs, its bytes off the free
            # bytes; the device's own state carries them for this decision only
            plan = planned_residents(ends, d.state.residents, self.size_of, now)
            if plan:
                planned.append((d, plan, d.state.free_bytes))
                free = d.state.free_bytes
                for r in plan:
                    d.state.residents[r.key] = r
                    sim.holder_count[r.key] = sim.holder_count.get(r.key, 0) + 1
                    free = max(0, free - r.nbytes)
                d.state.free_bytes = free
        model = self.models[f]
        if now > arrival:
            model = ModelInfo(f, model.nbytes, model.first_group_bytes, model.slo_s, 1, now - arrival)
        dec = self.sched.place(model, self.snap)
        for d, plan, free in planned:
            for r in plan:
                del d.state.residents[r.key]
                sim.holder_count[r.key] -= 1
            d.state.free_bytes = free
        return dec

    def place(self, rid: int, f: int, arrival: float, now: float) -> bool:
        """The engine's way in (torpor.dataplane.engine._run_on_device, torpor.runtime.placer):
        place, shed at arrival, open a ticket, wait for a stage. False: no device has room."""
        dec = self.decide(f, arrival, now)
        if dec is None:
            return False
        o = dec.option
        if o is None:
            self.status[rid] = UNSERVED
            self.unserved += 1
            self.misses += 1
            return True
        self.actions[o.action] = self.actions.get(o.action, 0) + 1
        self.predicted[rid] = now - arrival + o.completion_s
        self.action_of[rid] = _ACTION_CODE[o.action]
        probing = False
        if self.shedding and shed_at_arrival(dec):
            # the device path's rule: shed, unless it goes as a probe (admission.probe)
            if not self.probe(f, now):
                self.shed_at_arrival(rid, "late")
                return True
            probing = True
        spec = self.fn_model[f]
        d = self.by_name[o.device]
        copy_s = self.cost.nominal_seconds(spec.nbytes, self.sim.links.host_path(d.state.name))
        copy = o.action in ("swap", "peer")
        if self.shedding and not probing and copy and self.level(d, f, now) == HARMS:
            # its copy would evict a model waiting requests want: it would wait for them, and
            # be shed if they outlast its slack; when the work queued there already does, now
            slack = arrival + spec.slo_s - now - o.exec_s - copy_s
            if outlasted(work_ahead(d.tickets, now, None, 0.0, self.staging.lookahead)[0], slack):
                if not self.probe(f, now):
                    self.shed_at_arrival(rid, "harms")
                    return True
                probing = True
        head = d.open_batch.get(f)
        if head is not None and 1 + len(head.riders) < spec.max_batch:
            # dynamic batching: it joins the batch a request placed before it holds open there, and
            # runs in that batch's run without a stage of its own (device_path `_DeviceBatch.join`)
            head.riders += ((rid, arrival),)
            self.in_system += 1
            if head.staged:
                self.acquired[rid] = now
            return True
        if copy and f not in d.state.residents:
            self.copy_into_spare_room(d, f, rid, o, now)
        job = self.ticket(rid, f, arrival, now, dec, copy_s, probing)
        if spec.max_batch > 1:
            d.open_batch[f] = job
        self.enter(d, job, now)
        return True

    def probe(self, f: int, now: float) -> bool:
        """Let a request for `f` that would be shed at arrival through as a probe, recorded
        (admission.probe; the placer's `probe`)."""
        if not probe(now, self.last_run.get(f, -math.inf), self.last_probe.get(f, -math.inf),
                     self.cost.exec_seconds(f), self.fn_model[f].slo_s):
            return False
        self.last_probe[f] = now
        self.probes[f] = self.probes.get(f, 0) + 1
        return True

    def shed_at_arrival(self, rid: int, why: str) -> None:
        self.status[rid] = SHED_ARRIVAL
        self.shed_why[rid] = "arrival:" + why
        self.shed_arrival += 1
        self.misses += 1

    def copy_into_spare_room(self, d: _Dev, f: int, rid: int, o: Any, now: float) -> None:
        # the copy starts now where it evicts only idle models no waiting request wants
        # (torpor.runtime.residency.DevicePool.start_copy); the request finds it when staged
        victims = victim_order(self.evict_policy, self.candidates(d, now, True), now, d.wanted)
        spare = spare_victims(victims, d.state.free_bytes, self.models[f].nbytes, d.wanted)
        if spare is not None:
            for c in spare:
                self.sim.evict(d, c.key)
                self.evictions += 1
            self.start_copy(d, f, rid, o.source if o.action == "peer" else None, now)

    def ticket(self, rid: int, f: int, arrival: float, now: float, dec: Any, copy_s: float,
               probing: bool = False) -> _Job:
        """The request as the placer's `Ticket` holds it (`Placer.admit`); a probe is neither
        deferred nor shed (the device path's `probing`)."""
        o, spec, d = dec.option, self.fn_model[f], self.by_name[dec.option.device]
        due = arrival + spec.slo_s
        ex_new = self.cost.exec_seconds(f)
        job = _Job(rid, f, arrival, ex_new, None, dec.meets_slo, now, 0.0, due)
        job.key = (d.next_key + HOPELESS_DELAY_S if hopeless(dec) and not probing else d.next_key) if self.edf \
            else math.inf
        job.guard = arrival + spec.slo_s * self.sched.slo_margin
        r = d.state.residents.get(f)
        job.source = o.source if o.action == "peer" else None
        if o.action in ("swap", "peer") and r is None:
            job.transfer = o.transfer_s - o.start_s
            job.ready = now + o.transfer_s
        else:  # resident, or its copy started at arrival (`copy_into_spare_room`): it lands with that one
            job.ready = r.ready_at if r is not None and r.ready_at > now else 0.0
        job.copy_s = copy_s
        job.probe = probing
        job.defer_until = defer_deadline(due, ex_new, copy_s) if self.shedding and not probing else 0.0
        return job

    def enter(self, d: _Dev, job: _Job, now: float) -> None:
        d.tickets.append(job)
        self.in_system += 1
        self.enter_stage(d, job, now)
