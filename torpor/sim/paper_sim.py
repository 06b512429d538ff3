"""The Torpor paper's system on virtual time: its policies and baselines beside ours.

    sim = PaperSim(scenario, "paper", extras)        # extras: load_paper_scenario's per-model fields
    result = sim.run(times, fns, duration)             # a torpor.sim.simulation.SimResult

Same scenario, arrivals, transfer physics and result type as `torpor.sim.simulation`, so a run here
and `simulate(sc, "torpor", arrivals=...)` there are directly comparable:

- **Transfers**: `torpor.sim.simulation.LinkSharing` over the scenario's `LinkMap` (PCIe per GPU, a
  shared uplink for switch siblings, NVLink pairs): copies on a link share it, re-rated as
  others start and land; compute starts when the first group has landed and ends no earlier
  than the last group lands. Execution is the profiled time times the same seeded lognormal noise per request.
- **The paper's system** (`paper`, and the ablations `fifo`, `random`, `lru`): one global queue
  (`torpor.sim.paper.RRCQueue` or `FIFOQueue`), at most one request in flight per function, one
  request per GPU at a time; a request is dispatched only when a GPU is idle, placed by
  Algorithm 1 (`torpor.sim.paper.algorithm1`; `random_placement` for `random`), with two-list
  eviction (`evict_two_list`; `evict_lru` for `lru`) on the target. A peer copy's source is
  locked until the copy lands.
- **native**: every function in its own process, bound to one GPU for the whole run, first fit
  round robin in function order; a function takes its model plus its own CUDA context and
  framework (`native_MB`), and runs at the paper's Native latency (`native_ms`). Functions that
  do not fit are not served. One request per GPU at a time, FIFO.
- **keepalive** (INFless-KA): an instance (same footprint and latency as native) is started on a
  request when none is alive (a cold start of `cold_start_s`) on the GPU with the most free memory,
  and kept alive until it has been idle for the p99 of that function's inter-arrival gaps. When
  no GPU has room the function waits until an instance expires.

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
from torpor.sim import simulation as simulator
from torpor.sim.paper import (
    ACT_IDLE,
    ACT_LOCAL,
    ACT_NVLINK,
    CLASS_NAMES,
    LIGHT,
    FIFOQueue,
    GpuView,
    ResidentView,
    RRCQueue,
    algorithm1,
    classify,
    evict_lru,
    evict_two_list,
    host_activity,
    random_placement,
)
from torpor.sim.physics import LinkSharing
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

        def swap(path: tuple[str, ...]) -> float:
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
    `cold_start_s` and the paper's Table 4 row (`table4_*_ms`)."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScenarioError(f"cannot read scenario {p}: {e}") from None
    spec.update(override)
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

_DONE, _LANDED, _UNLOCK, _READY, _EXPIRE = 0, 1, 2, 3, 4


class _Res:
    __slots__ = ("last_used", "locks", "nbytes", "ready_at")

    def __init__(self, nbytes: int, ready_at: float, now: float):
        self.nbytes = nbytes
        self.ready_at = ready_at
        self.last_used = now
        self.locks = 0


class _Gpu:
    __slots__ = (
        "act",
        "busy",
        "busy_s",
        "copy_until",
        "cur",
        "cur_data",
        "done_at",
        "exec_end",
        "free",
        "name",
        "res",
        "run_start",
        "tok",
        "view",
    )

    def __init__(self, name: str, capacity: int):
        self.name = name
        self.free = capacity
        self.res: dict[int, _Res] = {}
        self.busy = False
        self.copy_until = 0.0
        self.act = ACT_IDLE
        self.busy_s = 0.0
        self.view: GpuView | None = None
        self.run_start = 0.0
        self.exec_end = 0.0  # when the running request's compute ends if its copy has landed
        self.cur: _Res | None = None  # the copy the running request waits on, if any
        self.tok = 0  # its completion event; bumped when a re-rated copy moves it
        self.done_at = 0.0
        self.cur_data: Any = None


class _Landed:
    """`key in view.models` for a GPU: a fully landed copy at `now`."""

    __slots__ = ("now", "res")

    def __init__(self, res: dict[int, _Res]):
        self.res = res
        self.now = 0.0

    def __contains__(self, key: Any) -> bool:
        r = self.res.get(key)
        return r is not None and r.ready_at <= self.now


class PaperSim:
    def __init__(self, sc: Scenario, policy: str, extras: list[ModelExtras] | None = None,
                 n_gpus: int | None = None):
        if policy not in POLICIES:
            raise ScenarioError(f"policy: unknown paper policy {policy!r}; expected one of {list(POLICIES)}")
        self.sc = sc
        self.policy = policy
        self.n = n_gpus or sc.gpus
        self.links = sc.links(self.n)
        self.cost = CostModel(self.links)
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
        arrivals_fn = np.asarray(arrivals_fn, dtype=np.int64)
        if self.policy == "native":
            lat, busy, counters = self._native(arrivals_t, arrivals_fn, noise)
        elif self.policy == "keepalive":
            lat, busy, counters = self._keepalive(arrivals_t, arrivals_fn, noise)
        else:
            lat, busy, counters = self._swap(arrivals_t, arrivals_fn, noise)
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

    # keep-alive ------------------------------------------------------------------------------------
    def _keepalive(self, t: np.ndarray, fns: np.ndarray, noise: np.ndarray):
        n_fn = self.sc.functions
        timeout = np.full(n_fn, math.inf)
        order = np.argsort(fns, kind="stable")
        bounds = np.flatnonzero(np.diff(fns[order])) + 1
        for grp in np.split(order, bounds):
            if len(grp) > 1:
                timeout[int(fns[grp[0]])] = float(np.percentile(np.diff(t[grp]), 99))
        free = [self.sc.gpu_memory] * self.n
        gpu_of: dict[int, int] = {}  # function -> GPU of its live (or starting) instance
        ready: dict[int, bool] = {}
        waiting: dict[int, deque] = {}  # function -> its requests before its instance is ready
        admit: deque = deque()  # functions with no instance, waiting for memory, in arrival order
        admitted: set = set()
        inflight = [0] * n_fn  # requests queued or running at the GPU
        last_done = [0.0] * n_fn
        token = [0] * n_fn
        gq = [deque() for _ in range(self.n)]
        running = [False] * self.n
        busy = 0.0
        lat = np.full(len(t), np.inf)
        heap: list = []
        seq = 0
        cold = 0
        expired = 0

        def push(at: float, kind: int, data: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, (at, seq, kind, data))
            seq += 1

        def start_gpu(d: int, now: float) -> None:
            nonlocal busy
            if running[d] or not gq[d]:
                return
            i = gq[d].popleft()
            f = int(fns[i])
            ex = self.fn_extra[f].native_s * noise[i]
            running[d] = True
            busy += ex
            push(now + ex, _DONE, (d, i))

        def enqueue(f: int, i: int, now: float) -> None:
            inflight[f] += 1
            token[f] += 1  # an instance with work is not idle
            gq[gpu_of[f]].append(i)
            start_gpu(gpu_of[f], now)

        def try_start(f: int, now: float) -> bool:
            nonlocal cold
            need = self.fn_extra[f].native_bytes
            d = max(range(self.n), key=lambda k: free[k])
            if free[d] < need:
                return False
            free[d] -= need
            gpu_of[f] = d
            ready[f] = False
            cold += 1
            push(now + self.fn_extra[f].cold_start_s, _READY, f)
            return True

        def admit_waiting(now: float) -> None:
            while admit:
                f = admit[0]
                if not try_start(f, now):
                    break
                admit.popleft()
                admitted.discard(f)

        def handle(ev: tuple) -> None:
            nonlocal expired
            now, _, kind, data = ev
            if kind == _READY:
                f = data
                ready[f] = True
                q = waiting.pop(f, deque())
                while q:
                    enqueue(f, q.popleft(), now)
                if inflight[f] == 0:
                    last_done[f] = now
                    push(now + timeout[f], _EXPIRE, (f, token[f]))
            elif kind == _DONE:
                d, i = data
                f = int(fns[i])
                lat[i] = now - t[i]
                running[d] = False
                inflight[f] -= 1
                last_done[f] = now
                if inflight[f] == 0 and math.isfinite(timeout[f]):
                    token[f] += 1
                    push(now + timeout[f], _EXPIRE, (f, token[f]))
                start_gpu(d, now)
            elif kind == _EXPIRE:
                f, tok = data
                if tok != token[f] or inflight[f] or f not in gpu_of or waiting.get(f):
                    return
                free[gpu_of.pop(f)] += self.fn_extra[f].native_bytes
                ready.pop(f, None)
                expired += 1
                admit_waiting(now)

        for i in range(len(t)):
            now = float(t[i])
            while heap and heap[0][0] <= now:
                handle(heapq.heappop(heap))
            f = int(fns[i])
            if f in gpu_of and ready.get(f):
                enqueue(f, i, now)
                continue
            waiting.setdefault(f, deque()).append(i)
            if f in gpu_of or f in admitted:
                continue
            if admit or not try_start(f, now):
                admit.append(f)
                admitted.add(f)
        while heap:
            handle(heapq.heappop(heap))
        return lat, busy, {"actions": {"cold_starts": cold, "expired": expired}}

    # the paper's swapping system -------------------------------------------------------------------
    def _swap(self, t: np.ndarray, fns: np.ndarray, noise: np.ndarray):
        policy = self.policy
        links, cost = self.links, self.cost
        n_fn = self.sc.functions
        gpus = [_Gpu(name, self.sc.gpu_memory) for name in links.devices]
        landed = [_Landed(g.res) for g in gpus]
        for g, lv in zip(gpus, landed):
            g.view = GpuView(g.name, True, lv, ACT_IDLE, links.siblings(g.name))
        by_name = {g.name: i for i, g in enumerate(gpus)}
        views = [g.view for g in gpus]
        holders: list[int] = [0] * n_fn
        cls = [e.cls for e in self.fn_extra]
        nbytes = [m.nbytes for m in self.fn_spec]
        first_b = [m.first_group_bytes for m in self.fn_spec]
        nv = {k: v for k, v in links.nvlink.items()}
        queue = FIFOQueue() if policy == "fifo" else RRCQueue()
        evict = evict_lru if policy == "lru" else evict_two_list
        pick_rng = np.random.default_rng(self.sc.seed + 7)
        fq = [deque() for _ in range(n_fn)]
        running = [False] * n_fn
        inflight: dict[str, int] = {}
        xfer = LinkSharing(links, cost.transfer_latency_s, inflight, simulator.SHARED_LINKS)
        lat = np.full(len(t), np.inf)
        heap: list = []
        seq = 0
        counters = {"swaps": 0, "peers": 0, "moved": 0, "evictions": 0, "waits": 0}
        branches: dict[str, int] = {}
        n_idle = self.n

        def nvlink_bw(src: str, dst: str) -> float | None:
            return nv.get((src, dst))

        def push(at: float, kind: int, data: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, (at, seq, kind, data))
            seq += 1

        def rerated(trs: list) -> None:
            # copies whose landing moved: their residents, the GPU's activity, and a run waiting on one
            for tr in trs:
                gi, r = tr.owner[0], tr.owner[1]
                g = gpus[gi]
                r.ready_at = tr.end
                push(tr.end, _LANDED, (tr, tr.version))
                if g.cur is r:
                    g.copy_until = tr.end
                    done = max(g.exec_end, tr.end)
                    if done != g.done_at:
                        g.done_at = done
                        g.tok += 1
                        push(done, _DONE, (*g.cur_data, g.tok))

        def plan_eviction(gi: int, f: int, now: float) -> list | None:
            g = gpus[gi]
            need = nbytes[f] - g.free
            if need <= 0:
                return []
            return evict((ResidentView(k, r.nbytes, r.last_used, cls[k], holders[k],
                                       r.locks > 0 or r.ready_at > now) for k, r in g.res.items()), need)

        def start(f: int, now: float) -> bool:
            nonlocal n_idle
            for lv in landed:
                lv.now = now
            for g, v in zip(gpus, views):
                v.idle = not g.busy
                v.activity = ACT_IDLE if not g.busy else g.act if g.copy_until > now else ACT_LOCAL
            excluded: list[GpuView] = []
            try:
                while True:
                    if policy == "random":
                        pl = random_placement(f, views, lambda n: int(pick_rng.integers(n)))
                    else:
                        pl = algorithm1(f, views, nvlink_bw)
                    if pl is None:
                        return False
                    gi = by_name[pl.gpu]
                    victims = [] if pl.action == "run" else plan_eviction(gi, f, now)
                    if victims is not None:
                        break
                    views[gi].idle = False  # locked residents fill it: try another idle GPU
                    excluded.append(views[gi])
            finally:
                for v in excluded:
                    v.idle = True
            branches[pl.branch] = branches.get(pl.branch, 0) + 1
            g = gpus[gi]
            i = fq[f].popleft()
            running[f] = True
            ex = self.exec_s[f] * noise[i]
            g.cur = None
            moved_trs: list = []
            if pl.action == "run":
                r = g.res[f]
                done = now + ex
                g.exec_end = done
                g.copy_until = now
                g.act = ACT_LOCAL
            else:
                for v in victims:
                    g.free += g.res.pop(v).nbytes
                    holders[v] -= 1
                counters["evictions"] += len(victims)
                if pl.action == "peer":
                    path = links.peer_path(pl.source, g.name)
                    g.act = ACT_NVLINK
                    counters["peers"] += 1
                else:
                    path = links.host_path(g.name)
                    g.act = host_activity(cls[f])
                    counters["swaps"] += 1
                # the first group at the share the copy starts with (it lands in well under 1 ms)
                first = cost.transfer_seconds(first_b[f], path, inflight)
                r = _Res(nbytes[f], now, now)
                src = None
                if pl.action == "peer":
                    src = (by_name[pl.source], f)
                    gpus[src[0]].res[f].locks += 1  # until the copy lands
                tr, moved_trs = xfer.start(now, nbytes[f], path, (gi, r, src))
                r.ready_at = tr.end
                g.res[f] = r
                g.free -= nbytes[f]
                holders[f] += 1
                counters["moved"] += nbytes[f]
                g.copy_until = tr.end
                g.exec_end = now + first + ex
                g.cur = r
                done = max(g.exec_end, tr.end)
            r.last_used = now
            g.busy = True
            n_idle -= 1
            g.run_start = now
            g.done_at = done
            g.cur_data = (gi, i, f)
            g.tok += 1
            if g.cur is r:  # before its completion: at a tie the link frees first, as it always has
                push(r.ready_at, _LANDED, (tr, tr.version))
            push(done, _DONE, (gi, i, f, g.tok))
            rerated([x for x in moved_trs if x.owner[1] is not r])
            return True

        def dispatch(now: float) -> None:
            while n_idle and len(queue):
                f = queue.pop()
                if not start(f, now):
                    queue.ready(f, float(t[fq[f][0]]))
                    return

        def handle(ev: tuple) -> None:
            nonlocal n_idle
            now, _, kind, data = ev
            if kind == _DONE:
                gi, i, f, tok = data
                g = gpus[gi]
                if tok != g.tok:
                    return  # its copy's landing moved, and the completion with it
                g.busy_s += now - g.run_start
                g.cur = None
                lat[i] = now - t[i]
                queue.record(f, lat[i], self.slo[f])
                running[f] = False
                g.busy = False
                n_idle += 1
                r = g.res.get(f)
                if r is not None:
                    r.last_used = now
                if fq[f]:
                    queue.ready(f, float(t[fq[f][0]]))
            elif kind == _LANDED:
                tr, version = data
                if version != tr.version:
                    return
                tr.owner[1].ready_at = now
                if tr.owner[2] is not None:
                    gi, f = tr.owner[2]
                    r = gpus[gi].res.get(f)
                    if r is not None:
                        r.locks -= 1
                rerated(xfer.finish(tr, now))

        i, n_req = 0, len(t)
        while i < n_req or heap:
            if heap and (i >= n_req or heap[0][0] <= t[i]):
                ev = heapq.heappop(heap)
                now = ev[0]
                queue.tick(now)
                handle(ev)
            else:
                now = float(t[i])
                queue.tick(now)
                f = int(fns[i])
                fq[f].append(i)
                if not running[f] and len(fq[f]) == 1:
                    queue.ready(f, now)
                i += 1
                dispatch(now)
                if fq[f] and fq[f][-1] == i - 1:
                    counters["waits"] += 1
                continue
            dispatch(now)
        if isinstance(queue, RRCQueue):
            self.alpha_history = queue.alpha_history
        busy = sum(g.busy_s for g in gpus)
        counters["actions"] = branches
        return lat, busy, counters


def parse_extras_default(sc: Scenario) -> list[ModelExtras]:
    """Extras for a scenario given without the paper's fields: native = resident, runtime
    overhead and cold start at their defaults, classes from the simulator's own profile."""
    prof = latency_profile(sc)
    return [ModelExtras(m.name, _spec_exec_s(m), int(m.nbytes + DEFAULT_CONTEXT_MB * MB), DEFAULT_COLD_START_S,
                        None, classify(p["resident_s"], p["host_s"])) for m, p in zip(sc.models, prof)]


def class_names(extras: list[ModelExtras]) -> dict[str, str]:
    return {e.name: CLASS_NAMES[e.cls] for e in extras}
