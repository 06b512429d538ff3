"""The node among its peers (issue 22): the residency report it serves, what it has heard of
its peers' reports, and the forward-once decision. State and decisions only: the front ends do
the I/O (`torpor.api.forward` polls the peers' reports and forwards requests) and reach this
through Engine methods (`residency`, `peer_report`, `peer_down`, `forward_target`,
`forward_done`, `forwarded_in`).

One source, three channels: `residency_report` is what `GET /v2/torpor/residency` returns,
what the Prometheus gauges are read from (torpor.api.prometheus) and what a router's
`NodeView` is made of (`torpor.scheduling.peers.node_view`)."""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from torpor.scheduling.peers import hot_seconds

# round trips the forwarding overhead is the median of: enough that one stalled request (a
# pause of the sender's loop, a slow poll) does not move it, few enough to follow a link that
# got slower within seconds
_SAMPLES = 32


@dataclass
class Peer:
    """What this node knows of one peer: its last report, how long ago, and the cost of
    reaching it."""

    name: str  # its HTTP base URL, as --peers gives it
    report: dict[str, Any] | None = None
    seen_at: float = 0.0  # time.monotonic() of the last report
    error: str = ""  # why the last poll failed ("" while it answers)
    rtt_s: float | None = None  # the last report poll's round trip
    # forwarding's own cost per request: each forward's round trip less the peer's own time, and
    # each report poll's round trip (a small request to the same listener). Polls keep it current
    # while nothing is forwarded: an estimate that only forwards could lower would, once too
    # high, stop the forwards that would correct it.
    samples: deque = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    forwards: Counter = field(default_factory=Counter)  # (protocol, outcome) -> requests

    def cost_s(self) -> float:
        """The forwarding overhead to count: the median of the recent samples (0 before any)."""
        return statistics.median(self.samples) if self.samples else 0.0


class PeerTable:
    """The peers' latest reports and the forwarding counters. A report older than `stale_s` is
    not trusted (the peer may have evicted the model since): a peer that stops answering is
    forgotten within that time even before a poll fails."""

    def __init__(self):
        self.node = ""
        self.peers: dict[str, Peer] = {}
        self.stale_s = 2.0
        self.received: Counter = Counter()  # protocol -> forwarded requests this node served

    def configure(self, node: str, peers: list[str], stale_s: float) -> None:
        """This node's name and its peers. A peer named again keeps what is known of it (its
        report, overhead, counters: torpor_forwards must not go back when the set changes)."""
        self.node = node
        self.peers = {p: self.peers.get(p) or Peer(p) for p in peers}
        self.stale_s = stale_s

    def active(self) -> bool:
        return bool(self.peers)

    def update(self, peer: str, report: dict[str, Any], rtt_s: float) -> None:
        p = self.peers[peer]
        p.report, p.seen_at, p.error = report, time.monotonic(), ""
        p.rtt_s = rtt_s
        p.samples.append(rtt_s)

    def down(self, peer: str, why: str) -> None:
        p = self.peers[peer]
        p.report, p.error = None, why or "no answer"

    def candidates(self, label: str) -> list[tuple[str, float]]:
        """(peer, predicted seconds to its answer) of each peer with a fresh report where model
        version `label` has landed on a device."""
        now = time.monotonic()
        out = []
        for p in self.peers.values():
            if p.report is None or now - p.seen_at > self.stale_s:
                continue
            seconds = hot_seconds(p.report, label, p.cost_s())
            if seconds is not None:
                out.append((p.name, seconds))
        return out

    def done(self, peer: str, protocol: str, outcome: str, seconds: float, server_s: float | None) -> None:
        """A forward ended: `outcome` "answered" (the peer's answer went back to the client),
        "failed" (no answer: served here instead) or "refused" (the peer answered UNAVAILABLE:
        served here instead). `seconds`: the round trip; `server_s`: the peer's own time, when
        it said (then the difference is a sample of the forwarding overhead)."""
        p = self.peers.get(peer)
        if p is None:
            return
        p.forwards[(protocol, outcome)] += 1
        if outcome == "answered" and server_s is not None:
            p.samples.append(max(0.0, seconds - server_s))

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "stale_s": self.stale_s,
            "received": dict(self.received),
            "peers": [{
                "peer": p.name,
                "node": (p.report or {}).get("node"),
                "up": p.report is not None and now - p.seen_at <= self.stale_s,
                "epoch": (p.report or {}).get("epoch"),
                "age_s": round(now - p.seen_at, 3) if p.seen_at else None,
                "error": p.error,
                "rtt_s": p.rtt_s,
                "overhead_s": round(p.cost_s(), 6) if p.samples else None,
                "forwards": [{"protocol": proto, "outcome": outcome, "requests": n}
                             for (proto, outcome), n in sorted(p.forwards.items())],
            } for p in self.peers.values()],
        }


def _model_state(devices: dict[str, str]) -> str:
    states = set(devices.values())
    return "device" if "resident" in states else "loading" if "landing" in states else "host"


class ReportEpoch:
    """The report's epoch: the device pool's (bumped on every placement, landing, eviction and
    host-store change) plus this counter, bumped when the registry's part of the report (models
    loading, or loaded to run where they are) differs from the last report's. Both only grow."""

    def __init__(self):
        self.value = 0
        self._last: tuple = ()

    def observe(self, registry_part: tuple) -> int:
        if registry_part != self._last:
            self._last = registry_part
            self.value += 1
        return self.value


def residency_report(registry: Any, runtime: Any, table: PeerTable, epoch: ReportEpoch,
                     default_slo_ms: float | None = None) -> dict[str, Any]:
    """The residency report (torpor.scheduling.peers shows its shape): the devices' part from the
    device runtime, models from the registry (those loading, and those that run where they are
    loaded, appear too) with their objective (`torpor.slo_ms`, else `default_slo_ms`; a router's
    slack), the node's SLO attainment over the window, and the forwarding state."""
    if runtime is not None:
        report = runtime.residency()
        device_models = report.pop("models")
    else:
        report = {"devices": [], "note": "no devices configured (--devices): models run where loaded", "epoch": 0}
        device_models = {}
    models: dict[str, Any] = {}
    registry_part = []
    met = missed = 0
    for name, entry in sorted(registry.models.items()):
        slo_ms = entry.slo_ms if entry.config is not None and entry.slo_ms is not None else default_slo_ms
        slo_s = None if slo_ms is None else slo_ms / 1e3
        for v, ve in sorted(entry.versions.items()):
            label = f"{name}:{v}"
            if ve.state == "LOADING":
                models[label] = {"name": name, "version": str(v), "state": "loading", "host": False, "devices": {},
                                 "slo_s": slo_s}
                registry_part.append((label, "loading"))
            elif ve.state == "READY" and ve.pool_key is not None and label in device_models:
                m = device_models[label]
                window = m["slo_window"]
                met, missed = met + window["met"], missed + window["missed"]
                seen = window["met"] + window["missed"]
                models[label] = {"name": name, "version": str(v), "state": _model_state(m["devices"]), **m,
                                 "slo_s": slo_s, "slo_attainment": round(window["met"] / seen, 6) if seen else None}
            elif ve.state == "READY":
                # runs where it was loaded: nothing to swap, nothing to place
                models[label] = {"name": name, "version": str(v), "state": "host", "host": True, "devices": {},
                                 "runs_where_loaded": True, "slo_s": slo_s}
                registry_part.append((label, "host"))
    report["models"] = models
    report["node"] = table.node
    report["epoch"] = int(report.get("epoch", 0)) + epoch.observe(tuple(registry_part))
    report["slo_attainment"] = round(met / (met + missed), 6) if met + missed else None
    report["forwarding"] = table.describe()
    return report
