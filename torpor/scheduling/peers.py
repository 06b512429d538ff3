"""What one Torpor node tells the others, and the forward-once rule (issue 22). Pure: no I/O.

A node's residency report (`GET /v2/torpor/residency`, `Engine.residency()`) is a JSON object:

    {"node": "10.0.0.2:8000", "epoch": 17, "slo_window_s": 60.0,
     "devices": [{"name": "cuda:0", "capacity_bytes": ..., "free_bytes": ..., "queue_length": 2,
                  "predicted_wait_s": 0.012, "models": [{"model": "resnet50:1", "state": "resident", ...}]}],
     "models": {"resnet50:1": {"name": "resnet50", "version": "1", "state": "device", "host": true,
                               "devices": {"cuda:0": "resident"}, "bytes": ..., "exec_s": 0.004,
                               "slo_window": {"met": 804, "missed": 8}, "slo_attainment": 0.990148}},
     "slo_attainment": 0.990148, "forwarding": {...}, ...}

docs/cluster.md describes every field.

- `SloWindow`: requests that met or missed their objective over the last `window_s` seconds.
- `node_view(report)`: the router's `NodeView` (torpor.scheduling.routing) of a report.
- `hot_seconds(report, label, overhead_s)`: how soon a node where a model is device-hot would
  answer a request for it, and `pick_peer` the forward-once rule over those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torpor.scheduling.routing import STATES, NodeView

# A model's state on a node, best first (routing.STATES): landed on a device, on its way to one
# (a copy in flight, or the registry still loading it), or only in host memory.
STATE_RANK = {state: rank for rank, state in enumerate(STATES)}


class SloWindow:
    """Met and missed requests over the last `window_s` seconds, in one-second buckets: adding
    is O(1) and the window slides without keeping one entry per request."""

    __slots__ = ("_buckets", "window_s")

    def __init__(self, window_s: float = 60.0):
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = float(window_s)
        self._buckets: dict[int, list[int]] = {}  # whole second -> [met, missed]

    def add(self, now: float, met: bool, n: int = 1) -> None:
        b = self._buckets.get(int(now))
        if b is None:
            self._prune(now)
            b = self._buckets[int(now)] = [0, 0]
        b[0 if met else 1] += n

    def _prune(self, now: float) -> None:
        oldest = int(now - self.window_s) + 1
        for second in [s for s in self._buckets if s < oldest]:
            del self._buckets[second]

    def counts(self, now: float) -> tuple[int, int]:
        """(met, missed) within the window ending at `now`."""
        self._prune(now)
        met = sum(b[0] for b in self._buckets.values())
        return met, sum(b[1] for b in self._buckets.values())

    def attainment(self, now: float) -> float | None:
        """Met / all within the window; None when no request with an objective was seen."""
        met, missed = self.counts(now)
        return met / (met + missed) if met + missed else None


def node_view(report: dict[str, Any], name: str | None = None) -> NodeView:
    """The router's `NodeView` (torpor.scheduling.routing) of a residency report: `models` by
    model name, its best version's state; `predicted_wait_s` the least over the devices (the
    soonest a new request could start on one); `free_bytes` and `queue_len` summed over the
    devices; `slo_attainment` over every model in the report's window (None: no request with
    an objective seen). `name`: the node's name where the report's own `node` is not the one
    the caller knows it by (a peer's URL, a replica's id)."""
    devices = report.get("devices") or []
    models: dict[str, str] = {}
    for m in (report.get("models") or {}).values():
        mname, state = m.get("name"), m.get("state")
        if mname is None or state not in STATE_RANK:
            continue
        if mname not in models or STATE_RANK[state] < STATE_RANK[models[mname]]:
            models[mname] = state
    attainment = report.get("slo_attainment")
    return NodeView(
        name=name or str(report.get("node", "")),
        epoch=int(report.get("epoch", 0)),
        models=models,
        predicted_wait_s=min((float(d.get("predicted_wait_s", 0.0)) for d in devices), default=0.0),
        free_bytes=sum(int(d.get("free_bytes", 0)) for d in devices),
        queue_len=sum(int(d.get("queue_length", 0)) for d in devices),
        slo_attainment=None if attainment is None else float(attainment),
    )


def hot_seconds(report: dict[str, Any], label: str, overhead_s: float) -> float | None:
    """Seconds until the node of `report` would answer a request for model version `label`
    ("name:version") sent to it now: the least predicted wait over the devices where the model
    has landed, plus its execution estimate and `overhead_s` (the forwarding round trip).
    None where the model has landed on none of its devices."""
    model = (report.get("models") or {}).get(label)
    if not model:
        return None
    hot = {d for d, state in (model.get("devices") or {}).items() if state == "resident"}
    waits = [float(d.get("predicted_wait_s", 0.0)) for d in report.get("devices") or () if d.get("name") in hot]
    if not waits:
        return None
    return min(waits) + float(model.get("exec_s") or 0.0) + overhead_s


def pick_peer(local_s: float, peers: Iterable[tuple[str, float]]) -> str | None:
    """The forward-once rule: the peer with the soonest predicted answer (`peers`: (name,
    seconds), see `hot_seconds`) where that beats `local_s`, the predicted completion of the
    local swap; else None (serve here)."""
    best, best_s = None, math.inf
    for name, seconds in peers:
        if seconds < best_s:
            best, best_s = name, seconds
    return best if best is not None and best_s < local_s else None
