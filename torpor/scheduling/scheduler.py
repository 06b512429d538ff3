"""Scheduler: where a request runs and where its model comes from. Pure logic over a snapshot.

The engine builds a `Snapshot` from the DevicePool (`torpor.runtime.residency`) and its per-device work
accounting; the simulator (`torpor.sim.simulation`) keeps one up to date on virtual time. Both call
the same `Scheduler.place(model, snapshot)`, which returns a `Decision`: a device, an action and
the residents to evict.

Options considered for every device `d` (policy "torpor"):

- **run**: the model is resident on `d` and `d` is idle: completion = rest of its copy (if still
  landing) + execution.
- **queue**: resident on `d` and `d` has work ahead: completion = that work + execution.
- **swap**: copy from host over `d`'s PCIe path (bandwidth shared with copies in flight on the
  same links, `torpor.scheduling.costmodel`), evicting idle residents in the eviction policy's order
  (`torpor.scheduling.eviction`, the same code the DevicePool runs) until it fits; pipelined completion.
  Where the snapshot says when each link clears (`Snapshot.link_clear`), the copy may wait for
  its path to clear and then move at full bandwidth, if that lands sooner
  (`CostModel.copy_plan`, `Option.start_s`): BERT-large over PCIe 3 lands in 112 ms alone and in
  224 ms beside a ResNet copy that has 3 ms left, at the share it starts with.
  Where the snapshot knows the bytes each copy in flight has left (`Snapshot.inflight_bytes`,
  processor sharing), a copy that would delay one in flight past the deadline of a request
  waiting on it (`Option.harms`) waits for its path to clear instead, so the bandwidth earlier
  copies were promised stays theirs; and a copy to a device whose work ahead waits on a copy
  landing there counts how much later that copy lands beside it (`CostModel.own_delay`).
- **peer**: copy from a device holding a landed copy, over NVLink (or PCIe peer-to-peer) where
  the topology has a path; same eviction and pipelining.

Among options whose estimated completion meets the SLO (times `slo_margin`, a hedge against
estimation error), the cheapest wins. Cost is resource-seconds: link time the copy occupies at
nominal bandwidth (so a peer copy over a fast link costs less than a host swap, and no copy
costs least), plus the expected reload time of what it evicts (`reload_s x P(requested within
horizon)`, reload from a replica being `peer_speedup` times cheaper: evicting a hot model is
dear), plus the device time the request holds: its run and any wait for its own copy beyond the
work already queued there. A copy to an idle device holds that device while it lands (a 2.5 GB
model over PCIe: ~100 ms for a 40 ms run); a copy queued behind other work lands during it and
holds the device only for the run, so where both meet the SLO the second is cheaper and the idle
device stays free for requests with tight objectives. Ties go to the earlier completion. When no option meets the SLO,
the fastest is chosen and the decision says so (`meets_slo=False`). When no option is possible
(every device full of pinned models) `place` returns None and the caller waits.

Baselines (for the simulator and as engine fallbacks):

- "lru-swap": resident anywhere -> the least-loaded holder; else host swap to the least-loaded
  device that can make room, LRU eviction. No peer copies, no SLO awareness.
- "static": each model bound to one device (`static_map`), kept there; a model with no device
  is not served.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from torpor.scheduling.costmodel import CostModel
from torpor.scheduling.eviction import Candidate, CostAwarePolicy, EvictionPolicy, LRUPolicy

# Deadline-ordered device queues (the engine's and the simulator's): a request the scheduler
# predicts will finish past its whole SLO wherever it goes (`hopeless`) is keyed this many
# seconds later, so it queues behind every request that can still meet its own; under
# overload, serving hopeless requests first only makes the next ones late as well (EDF's domino
# effect). Only past the whole SLO: the plan's margin is a hedge, and deferring requests that
# merely miss the margin made some late that would have been on time (560 functions on the V100
# mix: 98.9% of functions compliant instead of 99.5%).
HOPELESS_DELAY_S = 1000.0


def hopeless(decision: Decision) -> bool:
    """Predicted to finish past its whole SLO (not just the planning margin) wherever it goes."""
    o = decision.option
    return (o is not None and decision.slo_s is not None and not decision.meets_slo
            and decision.waited_s + o.completion_s > decision.slo_s)


@dataclass(slots=True)
class ResidentState:
    key: Any
    nbytes: int
    ready_at: float = 0.0  # when its copy has fully landed (snapshot clock)
    pins: int = 0  # requests queued or running on it
    last_used: float = 0.0
    locked_until: float = 0.0  # a peer copy reads it until then
    # when its copy should land if no further copy joins its links (processor sharing: the rate
    # it has now rises as the copies beside it land, so `ready_at`, the landing at today's rate,
    # is pessimistic); None: `ready_at` is the estimate
    eta: float | None = None

    def expected(self) -> float:
        """When its copy should have landed: `eta` where the owner keeps one, else `ready_at`."""
        return self.ready_at if self.eta is None else min(self.eta, self.ready_at)

    def evictable(self, now: float) -> bool:
        return self.pins == 0 and self.ready_at <= now and self.locked_until <= now


@dataclass(slots=True)
class DeviceState:
    name: str
    capacity: int
    free_bytes: int
    residents: dict[Any, ResidentState] = field(default_factory=dict)
    backlog_s: float = 0.0  # estimated seconds of work ahead of a new request (queued + running)
    queue_len: int = 0
    version: int = -1  # bumped by the owner whenever `residents` gains or loses a key; -1: unknown
    # seconds until a new request would be staged here and could start its copy (the server
    # takes memory for a request only a few requests before it runs, torpor.runtime.staging); None:
    # a copy starts at once (the simulator)
    stage_in_s: float | None = None


@dataclass
class Snapshot:
    now: float
    devices: list[DeviceState]
    inflight: Mapping[str, int] = field(default_factory=dict)  # link id -> transfers in flight
    rate: Callable[[Any], float] = lambda key: 0.0  # recent requests/s per model
    # key -> number of devices holding it; kept up to date by a caller that owns the state
    # (the simulator), computed once per snapshot otherwise
    holder_count: dict[Any, int] | None = None
    # link id -> bytes each copy in flight on it still has to move (anything with .get(link, ()));
    # None: only the counts in `inflight` are known, and copy estimates use the share at the start
    inflight_bytes: Any = None
    # link id -> when (snapshot clock) every copy in flight on it will have landed; None: unknown.
    # With it, a copy may wait for its path to clear and then move at full bandwidth
    # (`CostModel.copy_plan`) where that lands sooner than sharing the path from now.
    link_clear: Callable[[str], float] | None = None

    def clear_in(self, path: tuple[str, ...]) -> float | None:
        """Seconds until every copy in flight on `path` has landed (0: clear now; None: unknown)."""
        if self.link_clear is None:
            return None
        return max(0.0, max(self.link_clear(lk) for lk in path) - self.now)

    def holders(self, key: Any) -> list[DeviceState]:
        return [d for d in self.devices if key in d.residents]

    def replicas(self, key: Any) -> int:
        """Devices holding `key`, less one (0 for a single copy)."""
        if self.holder_count is None:
            counts: dict[Any, int] = {}
            for d in self.devices:
                for k in d.residents:
                    counts[k] = counts.get(k, 0) + 1
            self.holder_count = counts
        return self.holder_count.get(key, 0) - 1


@dataclass(slots=True)
class ModelInfo:
    key: Any
    nbytes: int
    first_group_bytes: int
    slo_s: float | None = None
    batch: int = 1
    waited_s: float = 0.0  # of its objective already spent before this decision (in admission queues)


class Action(StrEnum):
    """What the scheduler decided for a request. The device pool reports what it then did in
    its own words (`torpor.runtime.residency.Outcome`): a SWAP or PEER decision finds the model
    already landing (join) or landed (hit) when another request's copy got there first."""

    RUN = "run"  # resident, the device free
    QUEUE = "queue"  # resident, behind the work queued on the device
    SWAP = "swap"  # copy from host memory
    PEER = "peer"  # copy from another device holding it


class Outcome(StrEnum):
    """What acquiring the model on the chosen device did (`torpor.runtime.residency.Placement.outcome`):
    `Action` is what the scheduler planned, this is what happened."""

    HIT = "hit"  # resident and landed
    JOIN = "join"  # resident, its copy still landing (started by another request)
    HOST = "host"  # this request started a copy from host memory
    PEER = "peer"  # this request started a copy from another device


@dataclass(slots=True)
class Option:
    device: str
    action: Action
    source: str | None  # None (no copy), "host", or the peer device's name
    completion_s: float
    transfer_s: float = 0.0
    exec_s: float = 0.0
    evict: list[Any] = field(default_factory=list)
    evict_cost_s: float = 0.0
    bytes_moved: int = 0
    path: tuple[str, ...] = ()
    cost: float = 0.0
    meets_slo: bool = True
    harms: bool = False  # the copy would make a copy in flight land too late for a request waiting on it
    start_s: float = 0.0  # the copy waits this long for its path to clear (`CostModel.copy_plan`)
    risk_s: float = 0.0  # slack for estimates that have been wrong (`CostModel.risk_s`; 0 while exact)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "action": self.action, "source": self.source,
            "completion_ms": round(self.completion_s * 1e3, 3), "transfer_ms": round(self.transfer_s * 1e3, 3),
            "exec_ms": round(self.exec_s * 1e3, 3), "evict": [str(k) for k in self.evict],
            "bytes_moved": self.bytes_moved, "cost": round(self.cost, 6), "meets_slo": self.meets_slo,
        }


@dataclass(slots=True)
class Decision:
    option: Option | None  # None: not served (static policy, model has no device)
    meets_slo: bool
    slo_s: float | None
    options: list[Option] = field(default_factory=list)
    reason: str = ""
    waited_s: float = 0.0  # `ModelInfo.waited_s`: completion times count from the decision

    @property
    def device(self) -> str | None:
        return self.option.device if self.option else None

    @property
    def action(self) -> str | None:
        return self.option.action if self.option else None


class Scheduler:
    def __init__(
        self,
        cost: CostModel,
        policy: str = "torpor",
        *,
        eviction: EvictionPolicy | None = None,
        static_map: Mapping[Any, str] | None = None,
        slo_margin: float = 0.9,
        reuse_horizon_s: float = 60.0,
        peer_speedup: float = 8.0,
        keep_options: bool = False,
        order_ttl_s: float = 1.0,
        risk_power: float = 2.0,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}: expected one of {list(POLICIES)}")
        self.cost = cost
        self.policy = policy  # its name
        self.rules = POLICIES[policy]()
        if eviction is None:
            eviction = self.rules.default_eviction(peer_speedup)
        self.eviction = eviction
        self.static_map = dict(static_map or {})
        self.slo_margin = slo_margin
        self.reuse_horizon_s = reuse_horizon_s
        self.peer_speedup = peer_speedup
        self.keep_options = keep_options
        self.order_ttl_s = order_ttl_s
        self._order_cache: dict[tuple[int, str], tuple[int, float, list[Candidate]]] = {}
        self._slo: dict[Any, float | None] = {}  # key -> the objective it was last placed with (eviction risk)
        self.risk_power = risk_power

    # entry point ---------------------------------------------------------------------------------
    def place(self, model: ModelInfo, snap: Snapshot) -> Decision | None:
        self._slo[model.key] = model.slo_s
        return self.rules.place(self, model, snap)

    # Torpor's policy -----------------------------------------------------------------------------
    def options(self, model: ModelInfo, snap: Snapshot, *, resident: bool = True, copies: bool = True) -> list[Option]:
        """Every feasible option on every device (see the module docstring): those on devices
        holding the model (`resident`), and copies to the others (`copies`)."""
        now = snap.now
        exec_s = self.cost.exec_seconds(model.key, model.batch)
        holders = snap.holders(model.key)
        sources = [h for h in holders if h.residents[model.key].ready_at <= now]
        out: list[Option] = []
        for d in snap.devices:
            r = d.residents.get(model.key)
            if r is not None:
                if not resident:
                    continue
                landing = max(0.0, r.expected() - now)
                wait = d.backlog_s
                done = max(wait, landing) + exec_s
                action = Action.RUN if wait <= 0 else Action.QUEUE
                # device time it takes: its run, plus any wait for its own copy beyond the work ahead
                out.append(Option(d.name, action, None, done, 0.0, exec_s, cost=done - wait,
                                  risk_s=self.cost.risk_s(None, 0.0, model.key, exec_s)))
                continue
            if not copies or model.nbytes > d.capacity:
                continue
            evict = self._eviction_plan(d, model, snap)
            if evict is None:
                continue
            victims, evict_cost = evict
            # host swap over d's PCIe path
            path = self.cost.links.host_path(d.name)
            out.append(self._copy_option(d, model, snap, Action.SWAP, "host", path, exec_s, victims, evict_cost))
            # peer copies from every device holding a landed copy, where a path exists
            for s in sources:
                ppath = self.cost.links.peer_path(s.name, d.name)
                if ppath is not None:
                    out.append(self._copy_option(d, model, snap, Action.PEER, s.name, ppath, exec_s, victims, evict_cost))
        return out

    def _copy_option(self, d: DeviceState, model: ModelInfo, snap: Snapshot, action: Action, source: str,
                     path: tuple[str, ...], exec_s: float, victims: list[Any], evict_cost: float) -> Option:
        # only Torpor's policy waits for a path to clear; the baselines start every copy at once
        clear = snap.clear_in(path) if self.rules.plans_copy_starts else None
        start, transfer, first = self.cost.copy_plan(model.nbytes, model.first_group_bytes, path, snap.inflight,
                                                     snap.inflight_bytes, clear)
        harms = start <= 0 and any(delay > slack for delay, slack
                                   in self.cost.delays(model.nbytes, path, snap.inflight_bytes))
        if harms and clear is not None and clear > 0 and snap.inflight_bytes is not None:
            # processor sharing: rather than slow a copy in flight past the deadline of a request
            # waiting on it, wait until the path has cleared and then take all of it (the
            # bandwidth the earlier copies were promised stays theirs)
            start = clear
            transfer = clear + self.cost.nominal_seconds(model.nbytes, path)
            first = clear + self.cost.nominal_seconds(model.first_group_bytes, path)
            harms = False
        if d.stage_in_s is not None and d.stage_in_s > start:
            # the copy cannot start before the request is staged: the whole plan moves later
            shift = d.stage_in_s - start
            start, transfer, first = d.stage_in_s, transfer + shift, first + shift
        wait = d.backlog_s
        if start <= 0 and wait > 0 and snap.inflight_bytes is not None and self.rules.plans_copy_starts:
            # processor sharing: the work ahead may be waiting on a copy landing on this device,
            # which this copy slows down (a request queued behind a cold one waits for its copy)
            wait += self.cost.own_delay(model.nbytes, path, d.name, snap.inflight_bytes)
        done = self.cost.completion(wait, transfer, exec_s, first, start)
        link_s = self.cost.nominal_seconds(model.nbytes, path)
        return Option(d.name, action, source, done, transfer, exec_s, victims, evict_cost, model.nbytes,
                      path, cost=link_s + evict_cost + (done - d.backlog_s), harms=harms, start_s=start,
                      risk_s=self.cost.risk_s(path, transfer - start, model.key, exec_s))

    def _eviction_plan(self, d: DeviceState, model: ModelInfo, snap: Snapshot,
                       policy: EvictionPolicy | None = None) -> tuple[list[Any], float] | None:
        """Victims (in the eviction policy's order) freeing enough room on `d`, and their
        expected reload cost; None if even every idle resident is not enough."""
        need = model.nbytes - d.free_bytes
        if need <= 0:
            return [], 0.0
        policy = policy or self.eviction
        plan = self._walk(d, model, snap, *self._policy_order(d, snap, policy), need)
        if plan is None and d.version >= 0:  # a cached order misses residents added since: redo it fresh
            plan = self._walk(d, model, snap, *self._policy_order(d, snap, policy, fresh=True), need)
        if plan is None and d.stage_in_s is not None:
            # the server takes memory only when the request is staged (torpor.runtime.staging): what the
            # requests ahead of it pin now is theirs only until they have run
            plan = self._walk(d, model, snap, *self._policy_order(d, snap, policy), need, later=True)
        return plan

    def _walk(self, d: DeviceState, model: ModelInfo, snap: Snapshot, ordered_at: float,
              order: list[Candidate], need: int, later: bool = False) -> tuple[list[Any], float] | None:
        now = snap.now
        victims, freed, cost = [], 0, 0.0
        late: list[tuple[float, Candidate]] = []
        residents = d.residents

        def take(c: Candidate) -> bool:
            nonlocal freed, cost
            victims.append(c.key)
            freed += c.nbytes
            reload_s = c.reload_s / self.peer_speedup if c.replicas else c.reload_s
            cost += reload_s * (1.0 - math.exp(-c.rate * self.reuse_horizon_s))
            return freed >= need

        for c in order:
            r = residents.get(c.key)
            if r is None or not (later or r.evictable(now)):
                continue
            if r.last_used > ordered_at:
                late.append((r.last_used, c))  # used since the order was made: most recent now
                continue
            if take(c):
                return victims, cost
        for _, c in sorted(late, key=lambda t: t[0]):
            if take(c):
                return victims, cost
        return None

    def _policy_order(self, d: DeviceState, snap: Snapshot, policy: EvictionPolicy,
                      fresh: bool = False) -> tuple[float, list[Candidate]]:
        """Every resident of `d` in the policy's eviction order, with the time it was made.
        Where the snapshot's owner keeps device states across calls (`DeviceState.version` >= 0,
        the simulator) the order is reused for `order_ttl_s`: request rates move slowly (time
        constant of a minute); residents used or added since the order was made are the most
        recently used, so the walk takes them last (exact for LRU), and a walk that falls short
        is redone on a fresh order."""
        key = (id(policy), d.name)
        if d.version >= 0 and not fresh:
            hit = self._order_cache.get(key)
            if hit is not None and snap.now - hit[1] < self.order_ttl_s:
                return hit[1], hit[2]
        bw = self.cost.links.bandwidth(self.cost.links.host_path(d.name)[0])
        cands = [Candidate(r.key, r.nbytes, r.last_used, snap.rate(r.key), self._reload_s(r.key, r.nbytes / bw),
                           snap.replicas(r.key)) for r in d.residents.values()]
        order = policy.order(cands, snap.now)
        if d.version >= 0:
            self._order_cache[key] = (d.version, snap.now, order)
        return snap.now, order

    def _reload_s(self, key: Any, seconds: float) -> float:
        """What losing `key` costs, in seconds of reload. A model whose reload over its host
        link takes more than half its SLO margin misses whenever its copy shares the link with
        another as large (half the bandwidth, twice the time): BERT-large over PCIe 3, 112 ms
        of a 180 ms margin. Its reload counts `(margin / (margin - copy)) ** risk_power` times
        its copy time (x7 for that BERT), so eviction takes small, quickly reloaded models
        first and keeps such models resident. Below half the margin a reload costs its time."""
        if not self.rules.weighs_reload_risk:
            return seconds
        slo = self._slo.get(key)
        if not slo:
            return seconds
        limit = slo * self.slo_margin
        if seconds <= 0.5 * limit:
            return seconds
        return seconds * (limit / max(limit - seconds, 0.05 * limit)) ** self.risk_power

    def _decide(self, o: Option, model: ModelInfo) -> Decision:
        o.meets_slo = model.slo_s is None or o.completion_s <= model.slo_s * self.slo_margin
        return Decision(o, o.meets_slo, model.slo_s, [o] if self.keep_options else [])


# ------------------------------------------------------------------------------------------------
# the policies: how a request is placed, one class each, chosen once by name
# ------------------------------------------------------------------------------------------------


class PlacementPolicy:
    """How the scheduler places a request (`place`) and which of its refinements apply."""

    name = ""
    # waits for a busy path to clear rather than slow a copy in flight, and counts the delay its
    # own copy adds to work waiting on a copy to this device (processor sharing)
    plans_copy_starts = False
    # eviction weighs how much a model's reload risks its objective (`Scheduler._reload_s`)
    weighs_reload_risk = False

    def default_eviction(self, peer_speedup: float) -> EvictionPolicy:
        return CostAwarePolicy(peer_speedup)

    def place(self, s: Scheduler, model: ModelInfo, snap: Snapshot) -> Decision | None:
        raise NotImplementedError


class TorporPolicy(PlacementPolicy):
    """Ours: every option on every device, the cheapest that meets the objective (module docstring)."""

    name = "torpor"
    plans_copy_starts = True
    weighs_reload_risk = True

    def place(self, s: Scheduler, model: ModelInfo, snap: Snapshot) -> Decision | None:
        limit = None if model.slo_s is None else model.slo_s * s.slo_margin - model.waited_s
        opts = s.options(model, snap, copies=False)
        # A resident option that meets the SLO is the cheapest there is (a copy option costs the
        # same execution plus link time and evictions), so copies are only costed without one.
        # A copy that would delay a copy in flight past the deadline of a request waiting on it
        # (processor sharing: it takes min(its bytes, the other's bytes left) / bandwidth of that
        # copy's time; `Snapshot.inflight_bytes` carries the slack) counts as missing the SLO.
        if not any(limit is None or o.completion_s + o.risk_s <= limit for o in opts) or s.keep_options:
            opts += s.options(model, snap, resident=False)
        if not opts:
            return None
        for o in opts:
            # meets it with the slack its estimates have needed (0 while they were exact)
            o.meets_slo = (limit is None or o.completion_s + o.risk_s <= limit) and not o.harms
        good = [o for o in opts if o.meets_slo]
        if good:
            best = min(good, key=lambda o: (o.cost, o.completion_s))
        else:
            # nothing meets the SLO: the fastest option that breaks no other request's promise
            best = min(opts, key=lambda o: (o.harms, o.completion_s, o.cost))
        return Decision(best, best.meets_slo, model.slo_s, opts if s.keep_options else [],
                        waited_s=model.waited_s)

    # eviction -------------------------------------------------------------------------------------


class LruSwapPolicy(PlacementPolicy):
    """Baseline: run where resident (least backlog), else swap into the least busy device, LRU eviction."""

    name = "lru-swap"

    def default_eviction(self, peer_speedup: float) -> EvictionPolicy:
        return LRUPolicy()

    def place(self, s: Scheduler, model: ModelInfo, snap: Snapshot) -> Decision | None:
        now = snap.now
        exec_s = s.cost.exec_seconds(model.key, model.batch)
        holders = snap.holders(model.key)
        if holders:
            d = min(holders, key=lambda h: h.backlog_s)
            r = d.residents[model.key]
            done = max(d.backlog_s, r.ready_at - now) + exec_s
            o = Option(d.name, Action.RUN if d.backlog_s <= 0 else Action.QUEUE, None, done, 0.0, exec_s, cost=exec_s)
            return s._decide(o, model)
        best = None
        for d in sorted(snap.devices, key=lambda x: (x.backlog_s, -x.free_bytes)):
            if model.nbytes > d.capacity:
                continue
            plan = s._eviction_plan(d, model, snap, s.eviction)
            if plan is not None:
                best = s._copy_option(d, model, snap, Action.SWAP, "host", s.cost.links.host_path(d.name),
                                         exec_s, plan[0], plan[1])
                break
        return None if best is None else s._decide(best, model)


class StaticPolicy(PlacementPolicy):
    """Baseline: each model on the one device `static_map` gives it (native placement), never moved."""

    name = "static"

    def place(self, s: Scheduler, model: ModelInfo, snap: Snapshot) -> Decision | None:
        name = s.static_map.get(model.key)
        if name is None:
            return Decision(None, False, model.slo_s, reason="not served: no device holds this model")
        d = next(x for x in snap.devices if x.name == name)
        exec_s = s.cost.exec_seconds(model.key, model.batch)
        r = d.residents.get(model.key)
        if r is not None:
            done = max(d.backlog_s, r.ready_at - snap.now) + exec_s
            return s._decide(Option(d.name, Action.RUN if d.backlog_s <= 0 else Action.QUEUE, None, done, 0.0, exec_s,
                                       cost=exec_s), model)
        if model.nbytes > d.free_bytes:
            return None
        return s._decide(s._copy_option(d, model, snap, Action.SWAP, "host", s.cost.links.host_path(d.name),
                                              exec_s, [], 0.0), model)


POLICIES: dict[str, type[PlacementPolicy]] = {p.name: p for p in (TorporPolicy, LruSwapPolicy, StaticPolicy)}


def static_assignment(models: list[tuple[Any, int, float]], devices: list[tuple[str, int]]) -> dict[Any, str]:
    """Native placement: models (key, bytes, expected load in exec-seconds per second), hottest
    first, each to the device with the least load that still has room; what fits nowhere is
    not served. Returns key -> device name."""
    free = {name: cap for name, cap in devices}
    load = dict.fromkeys(free, 0.0)
    out: dict[Any, str] = {}
    for key, nbytes, work in sorted(models, key=lambda m: -m[2]):
        fits = [n for n in free if free[n] >= nbytes]
        if not fits:
            continue
        n = min(fits, key=lambda x: (load[x], -free[x]))
        free[n] -= nbytes
        load[n] += work
        out[key] = n
    return out
