"""The simulator's multi-node mode: N Torpor nodes behind one front router (issue 22, item 6).

    result = Cluster(scenario, nodes=6, routing="torpor").run(times, fns, duration)

Each node is a whole `Simulation` of the scenario's GPUs (its own scheduler, cost model, links,
eviction and queues), replayed by its own `Replay`, exactly as a single-node run. One
Simulation per node rather than one Simulation with its devices grouped by node, because a
node's scheduler must see only its own devices and links (hosts share no NVLink or PCIe
switch, and a peer copy between hosts is not an option a node has), which is what a separate
Simulation already is: the per-node code is untouched, and the cluster is only the router and a
loop that runs each node's events up to every arrival.

The front router sends each request to one node, by `routing`:

- `torpor`: `torpor.scheduling.routing.route` over one `NodeView` per node, built from that
  node's simulated state at the arrival instant, what its residency report would say then:
  per model on a device (landed), loading, or in host memory (a simulated node holds every
  model in host memory, as `torpor serve` with the whole repository loaded); the least
  predicted wait over its devices (the running batch's end as its scheduler sees it, then the
  requests queued there, each with its copy's landing: `admission.work_ahead` first come, first
  served, what the server's placer reports); its free device bytes and queue length. The
  request goes to the first node of the order; the objective it is routed with is the SLO times
  `slo_factor` (default the nodes' scheduler margin, the hedge each node plans with), its run
  time the model's profiled one, its copy time a host copy on an idle link.
- `round-robin`: request i to node i mod N (residency-blind, balanced).
- `hash`: each model to its rendezvous-hash owner (`rendezvous_owner`), whatever the load
  (consistent hashing: affinity, no balance).

The result counts what the single-node result counts over all requests, with per-request
`latency` and `node_of` on the Cluster for other counts (a warm-up cut), and what the routing
did: the share of requests that found their model on a device of the node they were sent to
(`hit_rate`), how many of a function's requests went to its most used node (`affinity`), and
each node's share of requests.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from torpor.scheduling.admission import work_ahead
from torpor.scheduling.routing import DEVICE, HOST, LOADING, NodeView, rendezvous_owner, route
from torpor.sim.errors import Errors
from torpor.sim.paper_sim import compliance
from torpor.sim.physics import DEFAULT_LINK_PHYSICS
from torpor.sim.replay import Replay
from torpor.sim.scenario import Scenario, ScenarioError
from torpor.sim.simulation import Simulation
from torpor.sim.staged import StagedReplay
from torpor.sim.state import _ACTION_CODE, _Dev
from torpor.sim.workload import scenario_arrivals

ROUTINGS = ("torpor", "round-robin", "hash")
_HITS = (_ACTION_CODE["run"], _ACTION_CODE["queue"])  # the model was on the device it was sent to


class _Report(Mapping):
    """A simulated node's models as its residency report shows them at `now`, computed on
    demand (the router reads one model per request): keys are function indices as strings."""

    def __init__(self, devs: list[_Dev], functions: int):
        self.devs = devs
        self.functions = functions
        self.now = 0.0

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            f = int(key)
        except (TypeError, ValueError):
            return default
        if not 0 <= f < self.functions:
            return default
        loading = False
        for d in self.devs:
            r = d.state.residents.get(f)
            if r is not None:
                if r.ready_at <= self.now:
                    return DEVICE
                loading = True
        return LOADING if loading else HOST  # every model is in the node's host memory

    def __getitem__(self, key: Any) -> str:
        state = self.get(key)
        if state is None:
            raise KeyError(key)
        return state

    def __iter__(self) -> Iterator[str]:
        return (str(f) for f in range(self.functions))

    def __len__(self) -> int:
        return self.functions


def predicted_wait(d: _Dev, now: float) -> float:
    """Seconds until a new request could start on `d`, as its scheduler sees it: the running
    batch's end (its model's landing included), then each queued request in turn, its own
    copy's landing included (`admission.work_ahead` first come, first served: the server's rule)."""
    free = now
    if d.running and d.cur_res is not None:
        r = d.cur_res
        free = max(d.bexec_end, r.ready_at if r.eta is None else r.expected())
    if not d.queue:
        return free - now
    return max(0.0, work_ahead(d.queue, now, None, 0.0, 0, free_at=free)[0])


@dataclass
class ClusterResult:
    routing: str
    nodes: int
    gpus_per_node: int
    requests: int
    attainment: float  # requests within SLO / all requests
    compliant_functions: float  # functions whose p98 is within SLO / functions with requests
    p50_ms: float
    p99_ms: float
    hit_rate: float  # requests that found their model on a device of their node / requests placed
    affinity: float  # requests sent to their function's most used node / requests routed
    node_share: list[float]  # each node's share of the requests routed
    swaps: int
    peer_copies: int
    bytes_moved: int
    evictions: int
    unserved: int
    gpu_busy: float  # busy seconds / (all GPUs x duration)
    wall_s: float
    duration_s: float
    stopped: bool = False  # given up past `stop_below`: the counts cover only what ran

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Cluster:
    """`nodes` simulated Torpor nodes of the scenario's GPUs each, behind a front router."""

    def __init__(self, scenario: Scenario, nodes: int, routing: str = "torpor", *, policy: str = "torpor",
                 link_physics: str = DEFAULT_LINK_PHYSICS, errors: Errors | None = None,
                 slo_factor: float | None = None):
        """`slo_factor`: the routing objective as a multiple of each model's SLO (default the
        nodes' scheduler margin); `math.inf`: routed with no objective (every node fits)."""
        if routing not in ROUTINGS:
            raise ScenarioError(f"routing: unknown routing {routing!r}; expected one of {list(ROUTINGS)}")
        if not isinstance(nodes, int) or nodes < 1:
            raise ScenarioError(f"nodes: expected a positive whole number, got {nodes!r}")
        self.sc = scenario
        self.routing = routing
        self.slo_factor = slo_factor
        # every node a whole Simulation: callers may adjust them before `run` (a platform's latencies)
        self.sims = [Simulation(scenario, policy, link_physics=link_physics, errors=errors) for _ in range(nodes)]
        self.names = [f"node-{k}" for k in range(nodes)]
        self.index = {n: k for k, n in enumerate(self.names)}
        self.reports = [_Report(s.devs, scenario.functions) for s in self.sims]
        self.latency = np.zeros(0)
        self.node_of = np.zeros(0, dtype=np.int16)
        self._rr = 0

    # ---- routing ---------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """What the router knows of each function, fixed for a run: its key, routing objective,
        run time and host copy time (each node's cost model, after any caller's adjustment)."""
        sim = self.sims[0]
        margin = sim.scheduler.slo_margin if self.slo_factor is None else self.slo_factor
        host = sim.links.host_path(sim.links.devices[0])
        self.keys = [str(f) for f in range(self.sc.functions)]
        self.slo = [None if math.isinf(margin) else m.slo_s * margin for m in sim.fn_model]
        self.exec_s = [m.exec_s for m in sim.fn_model]
        self.copy_s = [sim.cost.nominal_seconds(m.nbytes, host) for m in sim.models]
        self.owner = [self.index[rendezvous_owner(k, self.names)] for k in self.keys]

    def view(self, k: int, now: float, epoch: int) -> NodeView:
        """Node `k`'s residency report at `now`."""
        devs = self.sims[k].devs
        report = self.reports[k]
        report.now = now
        return NodeView(name=self.names[k], epoch=epoch, models=report,
                        predicted_wait_s=min(predicted_wait(d, now) for d in devs),
                        free_bytes=sum(d.state.free_bytes for d in devs), queue_len=sum(len(d.queue) for d in devs))

    def pick(self, i: int, f: int, now: float) -> int:
        """The node request `i` (for function `f`) is sent to."""
        if self.routing == "round-robin":
            self._rr += 1
            return (self._rr - 1) % len(self.sims)
        if self.routing == "hash":
            return self.owner[f]
        views = [self.view(k, now, i) for k in range(len(self.sims))]
        order = route(self.keys[f], self.slo[f], views, exec_s=self.exec_s[f], copy_s=self.copy_s[f])
        return self.index[order[0]]

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float, *,
            stop_below: float | None = None) -> ClusterResult:
        """Replay the arrivals: each node's events up to an arrival, then the arrival on the node
        the router picks; then every node's events left. `stop_below`: give up once more
        requests have missed their SLO than that attainment allows (`stopped` set, the counts
        then cover only what ran): a collapsed run is slow, and its verdict is already known."""
        t_wall = time.perf_counter()
        allowed = math.inf if stop_below is None else (1.0 - stop_below) * len(arrivals_t)
        self.stopped = False
        self._prepare()
        replays = [(StagedReplay if s.staging is not None else Replay)(s, arrivals_t, arrivals_fn, duration)
                   for s in self.sims]
        n = len(arrivals_t)
        node_of = self.node_of = np.full(n, -1, dtype=np.int16)  # -1: not routed (a run given up)
        for i in range(n):
            now = float(arrivals_t[i])
            for r in replays:
                heap = r.heap
                while heap and heap[0][0] <= now:
                    r.handle(heapq.heappop(heap))
            f = int(arrivals_fn[i])
            k = self.pick(i, f, now)
            node_of[i] = k
            replays[k].arrive(i, f, now)
            if i % 512 == 0 and allowed < math.inf and self._missed(replays, now) > allowed:
                self.stopped = True
                break
        for r in replays:
            while r.heap and not self.stopped:
                r.handle(heapq.heappop(r.heap))
        return self._result(replays, arrivals_fn, duration, time.perf_counter() - t_wall)

    def _missed(self, replays: list[Replay], now: float) -> int:
        """Requests known to miss by `now`: answered late or not at all, or still queued past
        their deadline (an overloaded node answers few, so its misses would show only at the end)."""
        late = sum(r.misses for r in replays)
        for s in self.sims:
            late += sum(1 for d in s.devs for j in d.queue if j.due < now)
        slo = self.sims[0].fn_model
        return late + sum(1 for r in replays for _, f, arrival in r.pending if arrival + slo[f].slo_s < now)

    def _result(self, replays: list[Replay], arrivals_fn: np.ndarray, duration: float, wall_s: float
                ) -> ClusterResult:
        n, nodes, node_of = len(arrivals_fn), len(self.sims), self.node_of
        latency = self.latency = np.full(n, np.inf)
        action = np.zeros(n, dtype=np.int8)
        for k, r in enumerate(replays):
            mine = node_of == k
            latency[mine] = r.latency[mine]
            action[mine] = r.action_of[mine]
        slo = np.array([m.slo_s for m in self.sims[0].fn_model])
        fns = np.asarray(arrivals_fn, dtype=np.int64)
        served = latency[np.isfinite(latency)]
        routed = node_of >= 0
        per = np.bincount(fns[routed] * nodes + node_of[routed], minlength=self.sc.functions * nodes)
        per = per.reshape(-1, nodes)
        n_routed = int(routed.sum())
        placed = int(np.count_nonzero(action))
        comp = compliance(latency, fns, slo)
        span = max(duration, max((d.busy_until for s in self.sims for d in s.devs), default=0.0))
        n_gpus = sum(s.n for s in self.sims)
        return ClusterResult(
            routing=self.routing, nodes=nodes, gpus_per_node=self.sims[0].n, requests=n,
            attainment=float(np.mean(latency <= slo[fns])) if n else 1.0,
            compliant_functions=comp["compliant"] / comp["functions"] if comp["functions"] else 1.0,
            p50_ms=float(np.percentile(served, 50) * 1e3) if served.size else math.nan,
            p99_ms=float(np.percentile(served, 99) * 1e3) if served.size else math.nan,
            hit_rate=float(np.isin(action, _HITS).sum() / placed) if placed else 0.0,
            affinity=float(per.max(axis=1).sum() / n_routed) if n_routed else 1.0,
            node_share=[float(x) for x in np.bincount(node_of[routed], minlength=nodes) / max(1, n_routed)],
            swaps=sum(r.swaps for r in replays), peer_copies=sum(r.peers for r in replays),
            bytes_moved=sum(r.moved for r in replays), evictions=sum(r.evictions for r in replays),
            unserved=sum(r.unserved for r in replays),
            gpu_busy=sum(d.busy_s for s in self.sims for d in s.devs) / (n_gpus * span) if span else 0.0,
            wall_s=wall_s, duration_s=duration, stopped=self.stopped,
        )


def compare_routings(sc: Scenario, nodes: int, routings: list[str] | None = None, *, trace_path: Any = None,
                     link_physics: str = DEFAULT_LINK_PHYSICS) -> dict[str, Any]:
    """Every routing (default all) over `nodes` nodes on the same arrivals: the report
    `torpor simulate --nodes N` prints and writes."""
    t, fn, duration = scenario_arrivals(sc, trace_path)
    results = [Cluster(sc, nodes, r, link_physics=link_physics).run(t, fn, duration) for r in routings or ROUTINGS]
    return {"scenario": sc.name, "source": sc.source, "nodes": nodes, "gpus_per_node": sc.gpus,
            "functions": sc.functions, "requests": len(t), "duration_s": duration, "workload": sc.workload,
            "results": [r.as_dict() for r in results]}

