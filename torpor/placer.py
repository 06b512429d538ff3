"""Placer: the engine's side of the scheduler. Where each request on a device-bound model runs.

The engine asks `place()` before it acquires a model from the DevicePool; the Placer builds a
`torpor.scheduler.Snapshot` of the pool as it is now (residents and their pins, copies still
landing, free bytes per device, the work already sent to each device, transfers in flight per
link) and hands it to the same `Scheduler` the simulator runs. The decision names a device and
where the copy comes from (none, the host, or a peer device); the engine then acquires the model
on that device from that source, so the pool's own eviction (same policy code) makes the room.

Accounting the snapshot needs and only the engine knows:

- **Backlog per device**: estimated seconds of work sent to a device and not yet finished
  (its worker threads run one request at a time in order, so that is the wait a new request
  sees). `admit()` adds a request's estimate, the returned ticket's `done()` takes it back.
- **Copies in flight**: the links each copy the scheduler ordered crosses, until it lands, so
  concurrent copies on one PCIe switch or NVLink see their shared bandwidth.
- **Measurements back**: execution times of requests that found the model resident (a cold
  run's time includes waiting for its groups, which would inflate the estimate) refine the
  CostModel's per-model estimate; finished host swaps refine the PCIe bandwidth.

Everything here runs on the event loop thread, no locks; nothing imports a web framework.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .costmodel import CostModel, ExecEstimator, LinkMap
from .scheduler import Decision, DeviceState, ModelInfo, ResidentState, Scheduler, Snapshot


@dataclass(slots=True)
class _Copy:
    resident: Any  # torpor.memory.Resident
    path: tuple[str, ...]
    eta: float  # monotonic time the whole copy should have landed
    source: str
    started: float
    concurrent: int  # copies already in flight on its links when it started


@dataclass(slots=True)
class ModelSlo:
    """Per model: what the scheduler decided and whether requests met their objective."""

    decisions: Counter = field(default_factory=Counter)  # action -> count
    predicted_misses: int = 0  # no option was expected to meet the SLO
    met: int = 0
    missed: int = 0  # measured request latency over its SLO

    def as_dict(self) -> dict[str, Any]:
        return {"decisions": dict(self.decisions), "predicted_misses": self.predicted_misses,
                "slo_met": self.met, "slo_missed": self.missed}


class Ticket:
    """One admitted request's share of a device's backlog; `done()` returns it once."""

    __slots__ = ("_placer", "device", "estimate", "decision", "_open")

    def __init__(self, placer: Placer, device: str | None, estimate: float, decision: Decision | None):
        self._placer = placer
        self.device = device
        self.estimate = estimate
        self.decision = decision
        self._open = device is not None

    def done(self) -> None:
        if self._open:
            self._open = False
            p = self._placer
            p.backlog[self.device] = max(0.0, p.backlog[self.device] - self.estimate)
            p.queued[self.device] -= 1


class Placer:
    def __init__(self, pool: Any, links: LinkMap, *, policy: str = "torpor", slo_margin: float = 0.9):
        self.pool = pool
        self.links = links
        self.cost = CostModel(links, ExecEstimator())
        self.scheduler = Scheduler(self.cost, policy, eviction=pool.policy, slo_margin=slo_margin)
        names = [m.device.name for m in pool.memories]
        self.backlog: dict[str, float] = dict.fromkeys(names, 0.0)
        self.queued: dict[str, int] = dict.fromkeys(names, 0)
        self._copies: list[_Copy] = []
        self.slo: dict[Any, ModelSlo] = {}

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

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        inflight = self._inflight(now)
        landing = {(id(c.resident)): c.eta for c in self._copies}
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
                residents[key] = ResidentState(key, r.nbytes, ready_at=ready, pins=r.pins, last_used=r.last_used,
                                               locked_until=now + 1e-3 if not r.readers_done() else 0.0)
            devices.append(DeviceState(name, m.capacity, m.free_bytes, residents, self.backlog[name],
                                       self.queued[name]))
        return Snapshot(now, devices, inflight, rate=self.pool._rate)

    # decisions -----------------------------------------------------------------------------------
    def place(self, key: Any, slo_s: float | None, batch: int = 1) -> Decision | None:
        model = self.pool.store.get(key)
        first = model.groups[0].nbytes if model.groups else 0
        decision = self.scheduler.place(ModelInfo(key, model.nbytes, first, slo_s, batch), self.snapshot())
        s = self.slo.setdefault(key, ModelSlo())
        if decision is None or decision.option is None:
            s.decisions["wait"] += 1
        else:
            s.decisions[decision.option.action] += 1
            if not decision.meets_slo:
                s.predicted_misses += 1
        return decision

    def admit(self, key: Any, decision: Decision | None, batch: int = 1) -> Ticket:
        """Count the request into its device's backlog (until `Ticket.done()`)."""
        if decision is None or decision.option is None:
            return Ticket(self, None, 0.0, decision)
        dev = decision.option.device
        est = self.cost.exec_seconds(key, batch)
        self.backlog[dev] += est
        self.queued[dev] += 1
        return Ticket(self, dev, est, decision)

    def copy_started(self, resident: Any, decision: Decision | None, outcome: str) -> None:
        """A swap the acquire just issued: remember its links until it lands."""
        now = time.monotonic()
        dev = resident.device.name
        if decision is not None and decision.option is not None and decision.option.path \
                and decision.option.device == dev:
            path = decision.option.path
            transfer = decision.option.transfer_s
        elif outcome == "peer":
            src = str(resident.source).removeprefix("peer:")
            path = self.links.peer_path(src, dev) or self.links.host_path(dev)
            transfer = self.cost.transfer_seconds(resident.model.nbytes, path, {})
        else:
            path = self.links.host_path(dev)
            transfer = self.cost.transfer_seconds(resident.model.nbytes, path, {})
        inflight = self._inflight(now)
        concurrent = max((inflight.get(lk, 0) for lk in path), default=0)
        self._copies.append(_Copy(resident, path, now + transfer, "host" if outcome == "host" else "peer",
                                  now, concurrent))

    def observe_exec(self, key: Any, seconds: float, batch: int = 1) -> None:
        self.cost.observe_exec(key, seconds, batch)

    def observe_latency(self, key: Any, seconds: float, slo_s: float | None) -> None:
        if slo_s is None:
            return
        s = self.slo.setdefault(key, ModelSlo())
        if seconds <= slo_s:
            s.met += 1
        else:
            s.missed += 1

    def forget(self, key: Any) -> None:
        self.cost.exec.forget(key)
        self.slo.pop(key, None)

    # description -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """`GET /v2/torpor/topology`: links (measured or configured), per-device backlog, the
        scheduler's policy, per-model execution estimates and SLO accounting."""
        now = time.monotonic()
        inflight = self._inflight(now)
        return {
            "policy": self.scheduler.policy,
            "eviction": self.pool.policy.name,
            "slo_margin": self.scheduler.slo_margin,
            **self.links.as_dict(),
            "inflight": inflight,
            "backlog_ms": {d: round(s * 1e3, 3) for d, s in self.backlog.items()},
            "queued": dict(self.queued),
            "exec_estimates_ms": {_name(m): {str(b): round(sec * 1e3, 4) for b, sec in per.items()}
                                  for m, per in self.cost.exec._est.items()},
            "swap_observations": {k: {"bytes": b, "seconds": round(s, 6)}
                                  for k, (b, s) in self.cost.swap_observations.items()},
            "models": {_name(k): v.as_dict() for k, v in self.slo.items()},
        }


def _name(key: Any) -> str:
    """As the residency endpoint names a (model, version) key."""
    return ":".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
