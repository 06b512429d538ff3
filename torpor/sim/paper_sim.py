"""The Torpor paper's system on virtual time: its policies and baselines beside ours.

    sim = PaperSim(scenario, "paper", extras)        # extras: load_paper_scenario's per-model fields
    result = sim.run(times, fns, duration)             # a torpor.sim.state.SimResult

Same scenario, arrivals, transfer physics and result type as `torpor.sim.simulation`, so a run here
and `simulate(sc, "torpor", arrivals=...)` there are directly comparable:

- **Transfers**: `torpor.sim.physics.LinkSharing` over the scenario's `LinkMap` (PCIe per GPU, a
  shared uplink for switch siblings, NVLink pairs): copies on a link share it, re-rated as
  others start and land or with the share a copy started with (`link_physics`, "shared" by
  default, as the simulation's); compute starts when the first group has landed and ends no
  earlier than the last group lands. Execution is the profiled time times the same seeded
  lognormal noise per request. The scenario's `errors` (`torpor.sim.errors`) give the same
  true times as the simulation's, request by request for the same seed: each request's copy
  jitter and execution factor, the true bandwidths, compute slowed by copies moving into it.
- **The paper's system** (`paper`, and the ablations `fifo`, `random`, `lru`;
  `torpor.sim.paper_swap.SwapReplay`): one global queue (`torpor.sim.paper.RRCQueue` or
  `FIFOQueue`), at most one request in flight per function, one request per GPU at a time; a
  request is dispatched only when a GPU is idle, placed by Algorithm 1
  (`torpor.sim.paper.algorithm1`; `random_placement` for `random`), with two-list eviction
  (`evict_two_list`; `evict_lru` for `lru`) on the target. A peer copy's source is locked
  until the copy lands.
- **native**: every function in its own process, bound to one GPU for the whole run, first fit
  round robin in function order; a function takes its model plus its own CUDA context and
  framework (`native_MB`), and runs at the paper's Native latency (`native_ms`). Functions that
  do not fit are not served. One request per GPU at a time, FIFO.
- **keepalive** (INFless-KA, `KeepAliveReplay`): an instance (same footprint and latency as
  native) is started on a request when none is alive (a cold start of `cold_start_s`) on the
  GPU with the most free memory, and kept alive until it has been idle for the p99 of that
  function's inter-arrival gaps. When no GPU has room the function waits until an instance
  expires.

Nothing here imports torch.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torpor.scheduling.costmodel import CostModel, LinkMap
from torpor.sim.errors import ERRORS_ENV, Errors, errors_from_env, merge_errors
from torpor.sim.paper import CLASS_NAMES, LIGHT, classify
from torpor.sim.paper_swap import SwapReplay
from torpor.sim.physics import DEFAULT_LINK_PHYSICS, LINK_PHYSICS, true_links
from torpor.sim.scenario import MB, Scenario, ScenarioError, parse_scenario
from torpor.sim.state import SimResult

POLICIES = ("paper", "fifo", "random", "lru", "native", "keepalive")
SWAP_POLICIES = ("paper", "fifo", "random", "lru")

# The prototype capped Native at 18 ResNet-152 functions per GPU (its own process, CUDA context
# and framework each); with the 25 GB budget that is 25000/18 - 241 MB, rounded down, of runtime
# per function.
DEFAULT_CONTEXT_MB = 1147.0
DEFAULT_COLD_START_S = 8.0  # the paper's ResNet-152 cold start


@dataclass
class ModelExtras:
    """Per-model numbers the paper's system needs beyond a simulator ModelSpec."""

    name: str
    native_s: float  # latency when run natively (the paper's Native column)
    native_bytes: int  # model + its own process's CUDA context and framework
    cold_start_s: float
    table4_ms: dict[str, float] | None = None  # the paper's Table 4 row, where given
    cls: int = LIGHT


def _spec_exec_s(spec: Any) -> float:
    f = getattr(spec, "exec_seconds", None)
    return float(f(1)) if callable(f) else float(spec.exec_s)


def latency_profile(sc: Scenario, links: LinkMap | None = None) -> list[dict[str, float]]:
    """Per model: the simulator's latency resident, swapped in from host (GPU 0's PCIe path,
    nothing else in flight) and copied from a peer over the fastest NVLink pair (seconds)."""
    links = links or sc.links(sc.gpus)
    cost = CostModel(links)
    fast = max(links.nvlink.items(), key=lambda kv: kv[1])[0] if links.nvlink else None
    out = []
    for m in sc.models:
        ex = _spec_exec_s(m)

        def swap(path: tuple[str, ...], m: Any = m, ex: float = ex) -> float:
            tr = cost.transfer_seconds(m.nbytes, path, {})
            first = cost.transfer_seconds(m.first_group_bytes, path, {})
            return max(first + ex, tr)

        host = swap(links.host_path(links.devices[0]))
        peer = swap(links.peer_path(*fast)) if fast else math.nan
        out.append({"model": m.name, "resident_s": ex, "host_s": host, "peer_s": peer})
    return out


def load_paper_scenario(path: str | Path, **override: Any) -> tuple[Scenario, list[ModelExtras]]:
    """A scenario file (torpor.sim.simulation's format; `override` replaces top-level fields such as
    functions, seed, workload or models) and, from `<stem>.paper.csv` beside it where present,
    the per-model numbers only the paper's system reads: `native_ms`, `native_MB`,
    `cold_start_s` and the paper's Table 4 row (`table4_*_ms`). `TORPOR_SIM_ERRORS`
    (`jitter=0.1,bandwidth_factor=0.8`, `torpor.sim.errors`) is laid over the scenario's
    `errors`: the command lines that load paper scenarios (loadtest/paper_eval.py) take the
    error model from it."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScenarioError(f"cannot read scenario {p}: {e}") from None
    spec.update(override)
    try:
        env = errors_from_env()
        if env is not None:
            spec["errors"] = merge_errors(spec.get("errors"), env, ERRORS_ENV)
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    side = p.with_name(p.stem + ".paper.csv")
    rows = read_extras_csv(side) if side.exists() else {}
    return parse_with_extras(spec, rows, base=p.parent, source=str(p))


def read_extras_csv(path: Path) -> dict[str, dict[str, float]]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return {}
    head = [h.strip() for h in lines[0].split(",")]
    if head[0] != "name":
        raise ScenarioError(f"{path}: the first column must be 'name'")
    out: dict[str, dict[str, float]] = {}
    for k, ln in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in ln.split(",")]
        if len(cells) != len(head):
            raise ScenarioError(f"{path}: row {k} has {len(cells)} cells for {len(head)} columns")
        row: dict[str, float] = {}
        for h, c in zip(head[1:], cells[1:]):
            try:
                v = float(c)
            except ValueError:
                raise ScenarioError(f"{path}: row {k} ({cells[0]}).{h}: expected a number, got {c!r}") from None
            if not v > 0:
                raise ScenarioError(f"{path}: row {k} ({cells[0]}).{h}: must be positive, got {c!r}")
            row[h] = v
        out[cells[0]] = row
    return out


def parse_with_extras(spec: dict[str, Any], rows: dict[str, dict[str, float]] | None = None, *,
                      base: Path | None = None, source: str = "scenario") -> tuple[Scenario, list[ModelExtras]]:
    sc = parse_scenario(spec, base=base, source=source)
    rows = rows or {}
    extras = []
    for m, prof in zip(sc.models, latency_profile(sc)):
        r = rows.get(m.name, {})
        t4 = {k[len("table4_"):-len("_ms")]: v for k, v in r.items() if k.startswith("table4_") and k.endswith("_ms")}
        ex = _spec_exec_s(m)
        # classes from resident vs host-swap latency: the paper's own profile where the scenario
        # carries it, else the simulator's
        if "pcie" in t4 and "resident" in t4:
            cls = classify(t4["resident"], t4["pcie"])
        else:
            cls = classify(prof["resident_s"], prof["host_s"])
        extras.append(ModelExtras(
            name=m.name,
            native_s=r.get("native_ms", ex * 1e3) / 1e3,
            native_bytes=int(r.get("native_MB", m.nbytes / MB + DEFAULT_CONTEXT_MB) * MB),
            cold_start_s=r.get("cold_start_s", DEFAULT_COLD_START_S),
            table4_ms=t4 or None,
            cls=cls,
        ))
    return sc, extras


# ------------------------------------------------------------------------------------------------
# Per-function compliance (the paper's metric), for every policy on the same rule
# ------------------------------------------------------------------------------------------------


def compliance(latency: np.ndarray, arrivals_fn: np.ndarray, slo_of_fn: np.ndarray, p: float = 0.98
               ) -> dict[str, int]:
    """Functions whose p-th percentile latency is within their deadline (a function with an
    unserved request is not compliant), of the functions that had requests; and how many had
    at least one request served ('executed')."""
    if len(latency) == 0:
        return {"compliant": 0, "functions": 0, "executed": 0}
    order = np.argsort(arrivals_fn, kind="stable")
    fns = arrivals_fn[order]
    bounds = np.flatnonzero(np.diff(fns)) + 1
    compliant = executed = total = 0
    for grp in np.split(order, bounds):
        total += 1
        lat = latency[grp]
        fin = np.isfinite(lat)
        executed += bool(fin.any())
        if fin.all() and float(np.percentile(lat, p * 100)) <= slo_of_fn[int(arrivals_fn[grp[0]])]:
            compliant += 1
    return {"compliant": compliant, "functions": total, "executed": executed}


def result_from(policy: str, gpus: int, latency: np.ndarray, arrivals_fn: np.ndarray, slo_of_fn: np.ndarray,
                duration: float, wall_s: float, busy_s: float, span: float, **counters: Any) -> SimResult:
    n = len(latency)
    served = latency[np.isfinite(latency)]
    ok = latency <= slo_of_fn[arrivals_fn] if n else np.zeros(0, dtype=bool)
    comp = compliance(latency, arrivals_fn, slo_of_fn)
    actions = dict(counters.pop("actions", {}) or {})
    actions.update(comp)
    return SimResult(
        policy=policy, gpus=gpus, requests=n, served=int(served.size), unserved=int(n - served.size),
        attainment=float(ok.mean()) if n else 1.0,
        compliant_functions=comp["compliant"] / comp["functions"] if comp["functions"] else 1.0,
        p50_ms=float(np.percentile(served, 50) * 1e3) if served.size else math.nan,
        p99_ms=float(np.percentile(served, 99) * 1e3) if served.size else math.nan,
        swaps=counters.get("swaps", 0), peer_copies=counters.get("peers", 0),
        bytes_moved=counters.get("moved", 0), evictions=counters.get("evictions", 0),
        gpu_busy=busy_s / (gpus * span) if span else 0.0, waits=counters.get("waits", 0),
        wall_s=wall_s, duration_s=duration, actions=actions,
    )


# ------------------------------------------------------------------------------------------------
# The simulation
# ------------------------------------------------------------------------------------------------

class PaperSim:
    """One of the paper's policies (`POLICIES`) on a scenario's node; `run` replays arrivals."""

    def __init__(self, sc: Scenario, policy: str, extras: list[ModelExtras] | None = None,
                 n_gpus: int | None = None, *, link_physics: str = DEFAULT_LINK_PHYSICS,
                 errors: Errors | None = None):
        """`extras`: `load_paper_scenario`'s per-model fields (None: `parse_extras_default`).
        `link_physics`: "shared" (the default) or "fixed", and `errors` (default the
        scenario's), as `torpor.sim.simulation.Simulation`'s: the same seed gives the same
        true-time draws request by request (`torpor.sim.errors.Errors.draws`)."""
        if policy not in POLICIES:
            raise ScenarioError(f"policy: unknown paper policy {policy!r}; expected one of {list(POLICIES)}")
        if link_physics not in LINK_PHYSICS:
            raise ScenarioError(f"link_physics: expected one of {list(LINK_PHYSICS)}, got {link_physics!r}")
        self.link_physics = link_physics
        self.sc = sc
        self.policy = policy
        self.n = n_gpus or sc.gpus
        self.errors = sc.errors if errors is None else errors
        self.links = sc.links(self.n)  # as configured: what Algorithm 1 reads
        # the truth: the copies' physics (the paper's system predicts nothing)
        self.true_links = true_links(sc.links(self.n), self.errors.bandwidth_factor)
        self.cost = CostModel(self.true_links, transfer_latency_s=sc.copy_latency_s)
        if extras is None:
            extras = parse_extras_default(sc)
        mix = sc.models
        self.fn_spec = [mix[f % len(mix)] for f in range(sc.functions)]
        self.fn_extra = [extras[f % len(mix)] for f in range(sc.functions)]
        self.slo = np.array([m.slo_s for m in self.fn_spec])
        self.exec_s = [_spec_exec_s(m) for m in self.fn_spec]
        self.alpha_history: list = []

    def run(self, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float) -> SimResult:
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.sc.seed + 1)  # the same per-request noise as torpor.sim.simulation
        noise = (rng.lognormal(0.0, self.sc.exec_noise, size=len(arrivals_t)) if self.sc.exec_noise
                 else np.ones(len(arrivals_t)))
        # the error model's draws, the same as the simulation's for the same seed (per request)
        copy_x, run_x = self.errors.draws(len(arrivals_t), self.sc.seed)
        if run_x is not None:
            noise = noise * run_x
        arrivals_fn = np.asarray(arrivals_fn, dtype=np.int64)
        if self.policy == "native":
            lat, busy, counters = self._native(arrivals_t, arrivals_fn, noise)
        elif self.policy == "keepalive":
            lat, busy, counters = KeepAliveReplay(self, arrivals_t, arrivals_fn, noise).run()
        else:
            lat, busy, counters = SwapReplay(self, arrivals_t, arrivals_fn, noise, copy_x).run()
        done = arrivals_t + np.where(np.isfinite(lat), lat, 0.0)
        span = max(duration, float(done.max()) if len(done) else 0.0)
        self.latency = lat
        return result_from(self.policy, self.n, lat, arrivals_fn, self.slo, duration, time.perf_counter() - t0,
                           busy, span, **counters)

    # native ----------------------------------------------------------------------------------------
    def native_assignment(self) -> dict[int, int]:
        """Function -> GPU index: function order, round robin over GPUs, each to the next GPU
        with room for its process; functions that fit nowhere are left out."""
        free = [self.sc.gpu_memory] * self.n
        out: dict[int, int] = {}
        g = 0
        for f in range(self.sc.functions):
            need = self.fn_extra[f].native_bytes
            for k in range(self.n):
                d = (g + k) % self.n
                if free[d] >= need:
                    free[d] -= need
                    out[f] = d
                    g = (d + 1) % self.n
                    break
        return out

    def _native(self, t: np.ndarray, fns: np.ndarray, noise: np.ndarray):
        where = self.native_assignment()
        free_at = [0.0] * self.n
        busy = 0.0
        lat = np.full(len(t), np.inf)
        for i in range(len(t)):
            d = where.get(int(fns[i]))
            if d is None:
                continue
            ex = self.fn_extra[int(fns[i])].native_s * noise[i]
            start = max(float(t[i]), free_at[d])
            free_at[d] = start + ex
            busy += ex
            lat[i] = free_at[d] - t[i]
        return lat, busy, {"actions": {"fit": len(where)}}


_DONE, _READY, _EXPIRE = 0, 3, 4  # keep-alive events


class KeepAliveReplay:
    """INFless-KA over arrivals `t` (functions `fns`, execution noise per request `noise`): an
    instance per function (its own process: `native_bytes`, `native_s`) started on a request
    when none is alive, on the GPU with the most free memory, after a cold start; kept alive
    until idle for the p99 of the function's inter-arrival gaps. A function finding no GPU
    with room waits, in arrival order, until an instance expires. `run` returns (latency per
    request, busy GPU-seconds, counters)."""

    def __init__(self, sim: PaperSim, t: np.ndarray, fns: np.ndarray, noise: np.ndarray):
        self.sim, self.t, self.fns, self.noise = sim, t, fns, noise
        self.extra = sim.fn_extra
        n_fn, n = sim.sc.functions, sim.n
        self.timeout = timeout = np.full(n_fn, math.inf)
        order = np.argsort(fns, kind="stable")
        bounds = np.flatnonzero(np.diff(fns[order])) + 1
        for grp in np.split(order, bounds):
            if len(grp) > 1:
                timeout[int(fns[grp[0]])] = float(np.percentile(np.diff(t[grp]), 99))
        self.free = [sim.sc.gpu_memory] * n
        self.gpu_of: dict[int, int] = {}  # function -> GPU of its live (or starting) instance
        self.ready: dict[int, bool] = {}
        self.waiting: dict[int, deque] = {}  # function -> its requests before its instance is ready
        self.admit: deque = deque()  # functions with no instance, waiting for memory, in arrival order
        self.admitted: set = set()
        self.inflight = [0] * n_fn  # requests queued or running at the GPU
        self.last_done = [0.0] * n_fn
        self.token = [0] * n_fn
        self.gq = [deque() for _ in range(n)]
        self.running = [False] * n
        self.busy = 0.0
        self.lat = np.full(len(t), np.inf)
        self.heap: list = []
        self.seq = 0
        self.cold = 0
        self.expired = 0

    def push(self, at: float, kind: int, data: Any) -> None:
        heapq.heappush(self.heap, (at, self.seq, kind, data))
        self.seq += 1

    def run(self) -> tuple[np.ndarray, float, dict[str, Any]]:
        t, heap = self.t, self.heap
        for i in range(len(t)):
            now = float(t[i])
            while heap and heap[0][0] <= now:
                self.handle(heapq.heappop(heap))
            self.arrive(i, now)
        while heap:
            self.handle(heapq.heappop(heap))
        return self.lat, self.busy, {"actions": {"cold_starts": self.cold, "expired": self.expired}}

    def arrive(self, i: int, now: float) -> None:
        f = int(self.fns[i])
        if f in self.gpu_of and self.ready.get(f):
            self.enqueue(f, i, now)
            return
        self.waiting.setdefault(f, deque()).append(i)
        if f in self.gpu_of or f in self.admitted:
            return
        if self.admit or not self.try_start(f, now):
            self.admit.append(f)
            self.admitted.add(f)

    def handle(self, ev: tuple) -> None:
        now, _, kind, data = ev
        if kind == _READY:
            self.on_ready(now, data)
        elif kind == _DONE:
            self.on_done(now, data)
        elif kind == _EXPIRE:
            self.on_expire(now, data)

    def on_ready(self, now: float, f: int) -> None:
        self.ready[f] = True
        q = self.waiting.pop(f, deque())
        while q:
            self.enqueue(f, q.popleft(), now)
        if self.inflight[f] == 0:
            self.last_done[f] = now
            self.push(now + self.timeout[f], _EXPIRE, (f, self.token[f]))

    def on_done(self, now: float, data: Any) -> None:
        d, i = data
        f = int(self.fns[i])
        self.lat[i] = now - self.t[i]
        self.running[d] = False
        self.inflight[f] -= 1
        self.last_done[f] = now
        if self.inflight[f] == 0 and math.isfinite(self.timeout[f]):
            self.token[f] += 1
            self.push(now + self.timeout[f], _EXPIRE, (f, self.token[f]))
        self.start_gpu(d, now)

    def on_expire(self, now: float, data: Any) -> None:
        f, tok = data
        if tok != self.token[f] or self.inflight[f] or f not in self.gpu_of or self.waiting.get(f):
            return
        self.free[self.gpu_of.pop(f)] += self.extra[f].native_bytes
        self.ready.pop(f, None)
        self.expired += 1
        self.admit_waiting(now)

    def start_gpu(self, d: int, now: float) -> None:
        if self.running[d] or not self.gq[d]:
            return
        i = self.gq[d].popleft()
        f = int(self.fns[i])
        ex = self.extra[f].native_s * self.noise[i]
        self.running[d] = True
        self.busy += ex
        self.push(now + ex, _DONE, (d, i))

    def enqueue(self, f: int, i: int, now: float) -> None:
        self.inflight[f] += 1
        self.token[f] += 1  # an instance with work is not idle
        self.gq[self.gpu_of[f]].append(i)
        self.start_gpu(self.gpu_of[f], now)

    def try_start(self, f: int, now: float) -> bool:
        need = self.extra[f].native_bytes
        free = self.free
        d = max(range(self.sim.n), key=lambda k: free[k])
        if free[d] < need:
            return False
        free[d] -= need
        self.gpu_of[f] = d
        self.ready[f] = False
        self.cold += 1
        self.push(now + self.extra[f].cold_start_s, _READY, f)
        return True

    def admit_waiting(self, now: float) -> None:
        while self.admit:
            f = self.admit[0]
            if not self.try_start(f, now):
                break
            self.admit.popleft()
            self.admitted.discard(f)


def parse_extras_default(sc: Scenario) -> list[ModelExtras]:
    """Extras for a scenario given without the paper's fields: native = resident, runtime
    overhead and cold start at their defaults, classes from the simulator's own profile."""
    prof = latency_profile(sc)
    return [ModelExtras(m.name, _spec_exec_s(m), int(m.nbytes + DEFAULT_CONTEXT_MB * MB), DEFAULT_COLD_START_S,
                        None, classify(p["resident_s"], p["host_s"])) for m, p in zip(sc.models, prof)]


def class_names(extras: list[ModelExtras]) -> dict[str, str]:
    return {e.name: CLASS_NAMES[e.cls] for e in extras}
