"""Placer: the engine's side of the scheduler. Where each request on a device-bound model runs.

The engine asks `place()` before it acquires a model from the DevicePool; the Placer builds a
`torpor.scheduling.scheduler.Snapshot` of the pool as it is now (residents and their pins, copies still
landing, free bytes per device, the work already sent to each device, transfers in flight per
link) and hands it to the same `Scheduler` the simulator runs. The decision names a device and
where the copy comes from (none, the host, or a peer device); the engine then acquires the model
on that device from that source, so the pool's own eviction (same policy code) makes the room.

Accounting the snapshot needs and only the engine knows:

- **Queues in deadline order** (policy "torpor", as the simulator's devices): a device's
  worker serves the lowest key first (`Device.run_in_worker(key=...)`). A request's key is its
  deadline (arrival + SLO; requests without an SLO get a soft one, `NO_SLO_DEADLINE_S`), so a
  short-deadline request goes ahead of queued work with time to spare, but only if none of
  the requests it would overtake, still on time now, would then finish past their SLO margin;
  otherwise it queues behind them all. A request the scheduler predicts will miss anyway
  queues behind every one that can still meet its SLO. Baselines queue first come, first served.
- **Work ahead per device** (`DeviceState.backlog_s`): the projected end of what runs now and
  what is queued ahead of this request in that order, each queued request counting its
  execution estimate and the landing of its own copy. `admit()` opens a ticket for the
  request on its device, `Ticket.started()` marks it running, `Ticket.done()` closes it.
- **Copies in flight**: the links each copy the scheduler ordered crosses, until it lands, so
  concurrent copies on one PCIe switch or NVLink see their shared bandwidth, and when each link
  should be clear (`Snapshot.link_clear`). A decision to wait for a path to clear
  (`Option.start_s`, the simulator's fixed-share physics) is started at once here: real links
  share bandwidth as copies come and go, so it lands no later than the estimate.
- **Measurements back**: execution times of requests that found the model resident (a cold
  run's time includes waiting for its groups, which would inflate the estimate) refine the
  CostModel's per-model estimate; finished host swaps refine the PCIe bandwidth.

Everything here runs on the event loop thread, no locks; nothing imports a web framework.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torpor.scheduling.admission import planned_residents, probe, work_ahead, would_delay
from torpor.scheduling.costmodel import CostModel, ExecEstimator, LinkMap
from torpor.scheduling.peers import SloWindow
from torpor.scheduling.scheduler import (
    HOPELESS_DELAY_S,
    Action,
    Decision,
    DeviceState,
    ModelInfo,
    Outcome,
    ResidentState,
    Scheduler,
    Snapshot,
    hopeless,
)

if TYPE_CHECKING:  # the pool's own modules need torch; the placer reads them only through PoolView
    from torpor.runtime.hoststore import HostStore
    from torpor.runtime.memory import DeviceMemory
    from torpor.runtime.staging import StagingQueue
    from torpor.scheduling.eviction import EvictionPolicy


class PoolView(Protocol):
    """What the placer reads of the device pool (`torpor.runtime.residency.DevicePool`): the
    devices' arenas (residents, free and total bytes), each model's bytes and layer groups in
    the host store, the eviction policy, each model's request rate and each device's staging
    queue (read for its deferral timers' lateness). It changes nothing there."""

    policy: EvictionPolicy
    memories: list[DeviceMemory]
    store: HostStore
    stages: dict[str, StagingQueue]

    def memory(self, device: str) -> DeviceMemory: ...

    def request_rate(self, key: Any) -> float: ...


@dataclass(slots=True)
class _Copy:
    resident: Any  # torpor.runtime.memory.Resident
    path: tuple[str, ...]
    eta: float  # monotonic time the whole copy should have landed
    source: str
    concurrent: int  # copies already in flight on its links when it started
    predicted_s: float = 0.0  # its own time on the copy stream as the cost model said when it started


@dataclass(slots=True)
class ModelSlo:
    """Per model: what the scheduler decided and whether requests met their objective."""

    decisions: Counter = field(default_factory=Counter)  # action -> count
    predicted_misses: int = 0  # no option was expected to meet the SLO
    met: int = 0
    missed: int = 0  # measured request latency over its SLO
    shed: Counter = field(default_factory=Counter)  # "arrival" | "queued" -> requests answered UNAVAILABLE
    # (when, why) -> requests: "late" (past its objective), "harms" (its copy would evict a model
    # waiting requests want), "stalls" (its copy would stall queued requests past their objectives)
    shed_why: Counter = field(default_factory=Counter)
    # met and missed over the last SLO_WINDOW_S (a shed request counts as missed): the
    # attainment the residency report gives peers and routers, which is about now, not since start
    window: SloWindow = field(default_factory=lambda: SloWindow(SLO_WINDOW_S))
    last_run: float = -math.inf  # time.monotonic() when one of its runs last ended
    last_probe: float = -math.inf  # when a request predicted hopeless was last let through (`probe`)
    probes: int = 0  # requests let through so (`probe`)
    run_account: Counter = field(default_factory=Counter)  # its runs, as `Placer.account` counts them

    def as_dict(self) -> dict[str, Any]:
        return {"decisions": dict(self.decisions), "predicted_misses": self.predicted_misses,
                "slo_met": self.met, "slo_missed": self.missed, "shed": dict(self.shed),
                "shed_reasons": {f"{w}:{r}": n for (w, r), n in sorted(self.shed_why.items())},
                "probes": self.probes, "run_account": {k: round(v, 6) for k, v in self.run_account.items()}}


SLO_WINDOW_S = 60.0  # the residency report's SLO attainment window
NO_SLO_DEADLINE_S = 10.0  # the queue key of a request without an objective: served, never starved


def _pct_ms(xs: list[float], f: float) -> float:
    """The `f` quantile of sorted seconds `xs` (the sample at or below it), in ms."""
    return round(xs[min(len(xs) - 1, int(f * len(xs)))] * 1e3, 3)


class PredictionLog:
    """The scheduler's predicted latency (from arrival) against the measured one, per action it
    chose (run, queue, swap, peer): how far its estimates are from what requests see. Keeps the
    last `keep` pairs per action; `as_dict` gives medians and the spread of the error."""

    def __init__(self, keep: int = 4096):
        self.keep = keep
        self.pairs: dict[str, deque] = {}
        self.counts: Counter = Counter()

    def add(self, action: str, predicted_s: float, measured_s: float) -> None:
        action = str(action)  # an Action is a str, but JSON encoders want plain str keys
        q = self.pairs.get(action)
        if q is None:
            q = self.pairs[action] = deque(maxlen=self.keep)
        q.append((predicted_s, measured_s))
        self.counts[action] += 1

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for action, q in sorted(self.pairs.items()):
            pred = sorted(p for p, _ in q)
            meas = sorted(m for _, m in q)
            err = sorted(m - p for p, m in q)
            out[action] = {
                "requests": self.counts[action], "window": len(q),
                "predicted_ms_p50": _pct_ms(pred, 0.5), "measured_ms_p50": _pct_ms(meas, 0.5),
                "predicted_ms_p99": _pct_ms(pred, 0.99), "measured_ms_p99": _pct_ms(meas, 0.99),
                "error_ms_p1": _pct_ms(err, 0.01), "error_ms_p50": _pct_ms(err, 0.5),
                "error_ms_p99": _pct_ms(err, 0.99),
                "late_vs_prediction_pct": round(100.0 * sum(1 for e in err if e > 0) / len(err), 2),
            }
        return out


class Lags:
    """Delays the scheduler's clock does not see, per kind, over the last `keep` of each:
    "admission", from a request's arrival to its placement (the event loop's backlog, admission
    queues); "release", from a run's end on the device's worker to the event loop acting on it
    (releasing its stage, granting the next); and in `describe`, "deferral_timer", how late the
    staging queues' deferral timers fired (`StagingQueue.timer_late`). loadtest/e2e.py prints them; the simulator's
    `Staging.release_s` (sim_vs_server.py --release-ms) is where a measured release lag would go."""

    def __init__(self, keep: int = 4096):
        self.keep = keep
        self.samples: dict[str, deque] = {}

    def add(self, kind: str, seconds: float) -> None:
        q = self.samples.get(kind)
        if q is None:
            q = self.samples[kind] = deque(maxlen=self.keep)
        q.append(seconds)

    def as_dict(self, **more: Iterable[float]) -> dict[str, Any]:
        """Per kind: samples, mean and percentiles in ms; `more`: other kinds' samples to add."""
        out = {}
        for kind, q in sorted({**self.samples, **more}.items()):
            xs = sorted(q)
            if not xs:
                continue
            out[kind] = {"samples": len(xs), "mean_ms": round(sum(xs) / len(xs) * 1e3, 3),
                         **{f"p{p}_ms": _pct_ms(xs, p / 100) for p in (50, 90, 99)}}
        return out


class Ticket:
    """One admitted request on its device: its place in the queue and its share of the work."""

    __slots__ = (
        "_open",
        "_placer",
        "decision",
        "device",
        "due",
        "estimate",
        "guard",
        "key",
        "model",
        "passed",
        "ready_at",
        "seq",
        "staged",
        "started_at",
        "transfer",
    )

    def __init__(self, placer: Placer, device: str | None, estimate: float, decision: Decision | None,
                 key: float = math.inf, due: float = math.inf, guard: float = math.inf, ready_at: float = 0.0,
                 transfer: float = 0.0, model: Any = None):
        self._placer = placer
        self.device = device
        self.estimate = estimate
        self.decision = decision
        self.key = key  # the device queue's order (lowest first)
        self.seq = next(placer._seq)
        self.due = due  # arrival + SLO
        self.guard = guard  # arrival + SLO x margin: nobody may push it past that
        self.ready_at = ready_at  # when its model has landed on the device (0: already)
        # seconds its copy takes once it starts: a request's copy starts only when it is staged
        # (torpor.runtime.staging), so until then its landing counts from its projected stage time
        self.transfer = transfer
        self.model = model  # the model it runs: queued requests of one model share one copy
        self.passed = False  # its staging queue is passing it over (torpor.runtime.staging)
        self.staged = False
        self.started_at: float | None = None
        self._open = device is not None
        if self._open:
            placer.tickets[device].append(self)

    def started(self) -> None:
        """Its execution began (called from the device's worker thread: a plain store)."""
        self.started_at = time.monotonic()

    def ride(self) -> None:
        """It joined a batch queued before it: the batch's run carries it."""
        self.estimate = 0.0

    def done(self) -> None:
        if self._open:
            self._open = False
            self._placer.tickets[self.device].remove(self)


class Placer:
    def __init__(self, pool: PoolView, links: LinkMap, *, policy: str = "torpor", slo_margin: float = 0.9):
        self.pool = pool
        self.links = links
        self.cost = CostModel(links, ExecEstimator())
        self.scheduler = Scheduler(self.cost, policy, eviction=pool.policy, slo_margin=slo_margin)
        self.deadline_order = policy == "torpor"
        self.lookahead = getattr(pool, "lookahead", 1)  # requests staged beyond the running ones
        names = [m.device.name for m in pool.memories]
        self.tickets: dict[str, list[Ticket]] = {n: [] for n in names}
        self._seq = itertools.count()
        self._keys: dict[str, float] = dict.fromkeys(names, math.inf)  # the last place() call's keys
        self._copies: list[_Copy] = []
        self.slo: dict[Any, ModelSlo] = {}
        self.predictions = PredictionLog()
        self.lags = Lags()
        # per device, where its worker's time in runs goes (`account`; the topology's run_account)
        self.runs_by_device: dict[str, Counter] = {n: Counter() for n in names}

    # queues --------------------------------------------------------------------------------------
    def _work_ahead(self, dev: str, now: float, due: float | None, exec_s: float,
                    ends: list | None = None) -> tuple[float, float, float]:
        """(seconds until the device reaches a new request, its queue key, seconds until it
        would be staged and could start its copy); see the module docstring. `due` None:
        first come, first served.

        Queued requests are projected in queue order: each runs when the device is free and
        ends no sooner than its model lands. A request not yet staged starts its copy when it
        gets a stage, which is when the request `lookahead` places ahead of it starts to run
        (torpor.runtime.staging): its landing counts from then."""
        return work_ahead(self.tickets[dev], now, due, exec_s, self.lookahead, ends=ends)

    # snapshot ------------------------------------------------------------------------------------
    def _inflight(self, now: float) -> dict[str, int]:
        counts: dict[str, int] = {}
        live = []
        for c in self._copies:
            r = c.resident
            if r.evicted or r.copy_done():
                self._finished_copy(c)
                continue
            live.append(c)
            for lk in c.path:
                counts[lk] = counts.get(lk, 0) + 1
        self._copies = live
        return counts

    def _finished_copy(self, c: _Copy) -> None:
        r = c.resident
        if r.evicted or r.batch is None:
            return
        seconds = r.batch.seconds()
        if seconds:
            self.cost.observe_swap(r.device.name, r.model.nbytes, seconds, source=c.source, concurrent=c.concurrent)
            self.cost.observe_copy(c.path, r.model.nbytes, seconds, c.predicted_s)

    def snapshot(self, due: float | None = None, exec_s: float = 0.0) -> Snapshot:
        """The pool as the scheduler sees it, for a request due at `due` (monotonic time;
        None: first-come-first-served queues) taking `exec_s` to run."""
        now = time.monotonic()
        inflight = self._inflight(now)
        landing = {(id(c.resident)): c.eta for c in self._copies}
        clear: dict[str, float] = {}  # link -> when the copies on it should all have landed
        for c in self._copies:
            for lk in c.path:
                clear[lk] = max(clear.get(lk, now), c.eta)
        devices = []
        for m in self.pool.memories:
            name = m.device.name
            residents = {}
            for key, r in m.residents.items():
                if r.evicted:
                    continue
                if r.copy_done():
                    ready = now - 1e-6
                else:
                    ready = landing.get(id(r), now + r.model.nbytes / self.links.bandwidth(f"pcie:{name}"))
                    # a copy later than its plan has not landed: it is not ready now, whatever the plan said
                    ready = max(ready, now + self.cost.transfer_latency_s)
                residents[key] = ResidentState(key, r.nbytes, ready_at=ready, pins=r.pins, last_used=r.last_used,
                                               locked_until=now + 1e-3 if not r.readers_done() else 0.0)
            ends: list = []
            backlog, self._keys[name], stage_in = self._work_ahead(name, now, due, exec_s, ends)
            free = m.free_bytes
            for r in planned_residents(ends, residents, lambda k: self.pool.store.get(k).nbytes, now):
                residents[r.key] = r  # a model a queued request will copy in: landing by the time that request runs
                free = max(0, free - r.nbytes)
            devices.append(DeviceState(name, m.capacity, free, residents, backlog, len(self.tickets[name]),
                                       stage_in_s=max(0.0, stage_in)))
        return Snapshot(now, devices, inflight, rate=self.pool.request_rate,
                        link_clear=lambda lk: clear.get(lk, now))

    # decisions -----------------------------------------------------------------------------------
    def place(self, key: Any, slo_s: float | None, batch: int = 1, arrival: float | None = None,
              record: bool = True) -> Decision | None:
        """Ask the scheduler; `arrival` (monotonic seconds) anchors the request's deadline.
        `record`: count the decision in the model's accounting (not for the profile at load)."""
        model = self.pool.store.get(key)
        first = model.groups[0].nbytes if model.groups else 0
        due = None
        if self.deadline_order:
            t0 = time.monotonic() if arrival is None else arrival
            due = t0 + (slo_s if slo_s is not None else NO_SLO_DEADLINE_S)
        snap = self.snapshot(due, self.cost.exec_seconds(key, batch))
        waited = 0.0 if arrival is None else max(0.0, snap.now - arrival)
        if record and arrival is not None:
            self.lags.add("admission", waited)
        decision = self.scheduler.place(ModelInfo(key, model.nbytes, first, slo_s, batch, waited), snap)
        if not record:
            return decision
        s = self._model_slo(key)
        if decision is None or decision.option is None:
            s.decisions["wait"] += 1
        else:
            s.decisions[str(decision.option.action)] += 1  # plain str keys for JSON
            if not decision.meets_slo:
                s.predicted_misses += 1
        return decision

    def admit(self, key: Any, decision: Decision | None, batch: int = 1, slo_s: float | None = None,
              arrival: float | None = None, probe: bool = False) -> Ticket:
        """Open the request's ticket on the device the scheduler chose (until `Ticket.done()`);
        its `key` orders the device's queue. `probe`: let through although predicted hopeless
        (admission.probe): it keeps the key deadline order gives it, not the hopeless one."""
        if decision is None or decision.option is None:
            return Ticket(self, None, 0.0, decision)
        o = decision.option
        now = time.monotonic()
        t0 = now if arrival is None else arrival
        due = guard = math.inf
        if slo_s is not None:
            due, guard = t0 + slo_s, t0 + slo_s * self.scheduler.slo_margin
        transfer = o.transfer_s - o.start_s if o.action in (Action.SWAP, Action.PEER) else 0.0
        ready = now + o.transfer_s if transfer else 0.0
        r = self.pool.memory(o.device).residents.get(key)
        if r is not None:
            # On the device already, landed or landing: a copy the scheduler planned may have
            # been started at arrival (DevicePool.start_copy). Its ticket has no copy of its own
            # left to make, only that one's landing; counted as a copy from its stage, it
            # projected the copy a second time for everyone behind it.
            transfer = 0.0
            ready = 0.0 if r.copy_done() else next((c.eta for c in self._copies if c.resident is r), now)
        qkey = math.inf
        if self.deadline_order:
            qkey = self._keys.get(o.device, math.inf)
            # behind everyone who can still make it (scheduler.HOPELESS_DELAY_S); not a probe, which
            # would wait there for good under overload, and on its stage for memory that requests
            # staged ahead of it at once keep pinned (a 30 s memory timeout)
            if hopeless(decision) and not probe:
                qkey += HOPELESS_DELAY_S
        return Ticket(self, o.device, self.cost.exec_seconds(key, batch), decision, key=qkey,
                      due=due, guard=guard, ready_at=ready, transfer=transfer, model=key)

    def would_delay(self, ticket: Ticket, stall_s: float) -> bool:
        """Holding `ticket`'s device `stall_s` longer than its run (a copy that cannot land
        under the run ahead) would make a request queued there late that is on time now."""
        return would_delay([k for k in self.tickets[ticket.device] if k is not ticket], time.monotonic(),
                           ticket.estimate + stall_s, self.lookahead)

    def backlog(self, device: str) -> float:
        """Seconds of work queued and running on `device` (in queue order, copies included)."""
        return self._work_ahead(device, time.monotonic(), None, 0.0)[0]

    def copy_seconds(self, key: Any, device: str) -> float:
        """How long a host copy of the model to `device` takes with its link to itself."""
        return self.cost.nominal_seconds(self.pool.store.get(key).nbytes, self.links.host_path(device))

    def staged(self, ticket: Ticket, placement: Any) -> None:
        """The request holds its stage and its model (`placement`, torpor.runtime.residency): record
        when the model lands, and remember the links of a copy it started until it lands."""
        ticket.staged = True
        r = placement.resident
        if placement.outcome == Outcome.HIT:
            ticket.ready_at = 0.0
        elif placement.outcome == Outcome.JOIN:
            ticket.ready_at = next((c.eta for c in self._copies if c.resident is r), ticket.ready_at)
        else:
            ticket.ready_at = self.copy_started(r, ticket.decision, placement.outcome)

    def copy_started(self, resident: Any, decision: Decision | None, outcome: str) -> float:
        """A swap the acquire just issued: remember its links until it lands; when it should."""
        now = time.monotonic()
        dev = resident.device.name
        if decision is not None and decision.option is not None and decision.option.path \
                and decision.option.device == dev:
            path = decision.option.path
        elif outcome == Outcome.PEER:
            src = str(resident.source).removeprefix("peer:")
            path = self.links.peer_path(src, dev) or self.links.host_path(dev)
        else:
            path = self.links.host_path(dev)
        inflight = self._inflight(now)
        # the share it gets now: the plan's own estimate counted from the decision, not from here
        transfer = self.cost.transfer_seconds(resident.model.nbytes, path, inflight)
        concurrent = max((inflight.get(lk, 0) for lk in path), default=0)
        # What its measured time (the copy stream's, CopyBatch.seconds) is held against: copies
        # into one device go one after another on its copy stream, so those ahead of it delay its
        # start, not its own time, which only copies into other devices sharing its links slow.
        # Held against the shared estimate, a copy that queued behind another came out at half
        # its prediction, and the calibration learned from them (0.81 under the CPU overload)
        # cut every estimate, copies alone included, by a fifth.
        beside: dict[str, int] = {}
        for c in self._copies:
            if c.resident.device is not resident.device:
                for lk in c.path:
                    beside[lk] = beside.get(lk, 0) + 1
        own = self.cost.transfer_seconds(resident.model.nbytes, path, beside)
        self._copies.append(_Copy(resident, path, now + transfer, "host" if outcome == Outcome.HOST else "peer",
                                  concurrent, own))
        return now + transfer

    def observe_exec(self, key: Any, seconds: float, batch: int = 1) -> None:
        self.cost.observe_exec(key, seconds, batch)

    def _model_slo(self, key: Any) -> ModelSlo:
        # not setdefault(key, ModelSlo()): that builds a ModelSlo (a Counter, a window) on every
        # request and run, present or not
        s = self.slo.get(key)
        if s is None:
            s = self.slo[key] = ModelSlo()
        return s

    def account(self, device: str, key: Any, hit: bool, run_s: float, wait_s: float, work_s: float) -> None:
        """One run on `device`: `run_s` in the model's execute (`wait_s` of it blocked on its
        copy's groups), `work_s` from the worker taking it to done (collecting the batch
        included). Beside the worker's busy time, it says how much of a device's time goes to
        computing, to copy waits inside runs, and to the rest; `hit`: its model had landed
        when the request was staged. On CUDA a run's wait for a group is a stream wait that
        blocks no thread, so there the copy waits count as computing (`RunState.wait_s`)."""
        for c in (self.runs_by_device[device], self._model_slo(key).run_account):
            c["runs"] += 1
            c["hit_runs"] += hit
            c["compute_s"] += run_s - wait_s
            c["copy_wait_s"] += wait_s
            c["work_s"] += work_s

    def ran(self, key: Any) -> None:
        """One of the model's runs ended (the probe rule's clock)."""
        self._model_slo(key).last_run = time.monotonic()

    def probe(self, key: Any, slo_s: float | None, batch: int = 1) -> bool:
        """Let this request, predicted hopeless, through anyway (admission.probe); recorded."""
        if slo_s is None:
            return False
        s = self._model_slo(key)
        now = time.monotonic()
        if not probe(now, s.last_run, s.last_probe, self.cost.exec_seconds(key, batch), slo_s):
            return False
        s.last_probe = now
        s.probes += 1
        return True

    def seed_exec(self, key: Any, seconds: float, batch: int = 1) -> None:
        """A profiled execution time (replaces the estimate for that batch size)."""
        self.cost.exec.seed(key, seconds, batch)

    def shed(self, key: Any, when: str, requests: int = 1, reason: str = "late") -> None:
        """Requests refused under overload: at `arrival` or when their turn came (`queued`;
        a batch formed while waiting is refused whole), and why (`ModelSlo.shed_why`)."""
        s = self._model_slo(key)
        s.shed[when] += requests
        s.shed_why[(when, reason)] += requests
        s.window.add(time.monotonic(), False, requests)

    def observe_latency(self, key: Any, seconds: float, slo_s: float | None, ticket: Ticket | None = None) -> None:
        """A request answered `seconds` after arrival: its SLO accounting, and the scheduler's
        prediction for it (`ticket`) against what it took."""
        if ticket is not None and ticket.decision is not None and ticket.decision.option is not None:
            d = ticket.decision
            self.predictions.add(d.option.action, d.waited_s + d.option.completion_s, seconds)
        if slo_s is None:
            return
        s = self._model_slo(key)
        if seconds <= slo_s:
            s.met += 1
        else:
            s.missed += 1
        s.window.add(time.monotonic(), seconds <= slo_s)

    def forget(self, key: Any) -> None:
        self.cost.exec.forget(key)
        self.slo.pop(key, None)

    # description -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """`GET /v2/torpor/topology`: links (measured or configured), per-device backlog, the
        scheduler's policy, per-model execution estimates and SLO accounting, and its predicted
        against measured latency per action."""
        now = time.monotonic()
        inflight = self._inflight(now)
        return {
            "policy": self.scheduler.policy,
            "eviction": self.pool.policy.name,
            "slo_margin": self.scheduler.slo_margin,
            **self.links.as_dict(),
            "inflight": inflight,
            "queue_order": "deadline" if self.deadline_order else "fifo",
            "backlog_ms": {d: round(self._work_ahead(d, now, None, 0.0)[0] * 1e3, 3) for d in self.tickets},
            "queued": {d: len(t) for d, t in self.tickets.items()},
            "busy_s": {m.device.name: round(m.device.busy_seconds, 6) for m in self.pool.memories},
            "run_account": {d: {k: round(v, 6) for k, v in c.items()} for d, c in self.runs_by_device.items()},
            "exec_estimates_ms": self.cost.exec.as_dict(_name),
            # measured / predicted: runs per model, copies per link path (the slack `risk_s` keeps)
            "calibration": {"runs": self.cost.runs.as_dict(_name),
                            "copies": self.cost.copies.as_dict(lambda p: ">".join(p))},
            "swap_observations": {k: {"bytes": b, "seconds": round(s, 6)}
                                  for k, (b, s) in self.cost.swap_observations.items()},
            "models": {_name(k): v.as_dict() for k, v in self.slo.items()},
            "predictions": self.predictions.as_dict(),
            "lags_ms": self.lags.as_dict(deferral_timer=[x for q in self.pool.stages.values() for x in q.timer_late]),
        }


def _name(key: Any) -> str:
    """As the residency endpoint names a (model, version) key."""
    return ":".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
