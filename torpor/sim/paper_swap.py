"""The paper's swapping system on virtual time (`SwapReplay`: `paper` and the ablations `fifo`,
`random`, `lru`), one of the policies `torpor.sim.paper_sim.PaperSim` runs.

One global queue (`torpor.sim.paper.RRCQueue` or `FIFOQueue`), at most one request in flight
per function, one request per GPU at a time; a request is dispatched only when a GPU is idle,
placed by Algorithm 1 (`torpor.sim.paper.algorithm1`; `random_placement` for `random`), with
two-list eviction (`evict_two_list`; `evict_lru` for `lru`) on the target. Copies move over
`torpor.sim.physics.LinkSharing`; compute starts when the first group has landed and ends no
earlier than the last group lands. A peer copy's source is locked until the copy lands.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from torpor.sim.paper import (
    ACT_IDLE,
    ACT_LOCAL,
    ACT_NVLINK,
    FIFOQueue,
    GpuView,
    Placement,
    ResidentView,
    RRCQueue,
    algorithm1,
    evict_lru,
    evict_two_list,
    host_activity,
    random_placement,
)
from torpor.sim.physics import Compute, LinkSharing

if TYPE_CHECKING:  # for annotations only: paper_sim imports this module
    from torpor.sim.paper_sim import PaperSim

_DONE, _LANDED = 0, 1


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
        "compute",
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
        self.compute: Compute | None = None  # compute slowed by copies moving into it (None: never)


class _Landed:
    """`key in view.models` for a GPU: a fully landed copy at `now`."""

    __slots__ = ("now", "res")

    def __init__(self, res: dict[int, _Res]):
        self.res = res
        self.now = 0.0

    def __contains__(self, key: Any) -> bool:
        r = self.res.get(key)
        return r is not None and r.ready_at <= self.now


class SwapReplay:
    """Arrivals `t` (functions `fns`, execution noise per request `noise`, the link-time factor
    of the copy each request's dispatch starts `copy_x`, None: 1) through the paper's system as
    `sim` describes it (policy, GPUs, links, per-function models and classes), at the true
    times of `sim.errors` (the copies over `sim.true_links`, compute slowed by copies moving
    into its GPU). `run` returns (latency per request, busy GPU-seconds, counters)."""

    def __init__(self, sim: PaperSim, t: np.ndarray, fns: np.ndarray, noise: np.ndarray,
                 copy_x: np.ndarray | None = None):
        self.sim, self.t, self.fns, self.noise, self.copy_x = sim, t, fns, noise, copy_x
        self.policy = policy = sim.policy
        self.links, self.cost = links, cost = sim.links, sim.cost
        n_fn = sim.sc.functions
        self.gpus = gpus = [_Gpu(name, sim.sc.gpu_memory) for name in links.devices]
        self.landed = [_Landed(g.res) for g in gpus]
        slow = sim.errors.copy_slowdown
        for g in gpus:
            g.compute = Compute(slow) if slow != 1 else None
        for g, lv in zip(gpus, self.landed):
            g.view = GpuView(g.name, True, lv, ACT_IDLE, links.siblings(g.name))
        self.by_name = {g.name: i for i, g in enumerate(gpus)}
        self.views = [g.view for g in gpus]
        self.holders: list[int] = [0] * n_fn
        self.cls = [e.cls for e in sim.fn_extra]
        self.nbytes = [m.nbytes for m in sim.fn_spec]
        self.first_b = [m.first_group_bytes for m in sim.fn_spec]
        self.nv = {k: v for k, v in links.nvlink.items()}
        self.queue = FIFOQueue() if policy == "fifo" else RRCQueue()
        self.evict = evict_lru if policy == "lru" else evict_two_list
        self.pick_rng = np.random.default_rng(sim.sc.seed + 7)
        self.fq = [deque() for _ in range(n_fn)]  # each function's requests not yet dispatched
        self.running = [False] * n_fn
        self.inflight: dict[str, int] = {}
        self.xfer = LinkSharing(sim.true_links, cost.transfer_latency_s, self.inflight, sim.link_physics == "shared")
        self.lat = np.full(len(t), np.inf)
        self.heap: list = []
        self.seq = 0
        self.counters = {"swaps": 0, "peers": 0, "moved": 0, "evictions": 0, "waits": 0}
        self.branches: dict[str, int] = {}
        self.n_idle = sim.n

    def nvlink_bw(self, src: str, dst: str) -> float | None:
        return self.nv.get((src, dst))

    def push(self, at: float, kind: int, data: Any) -> None:
        heapq.heappush(self.heap, (at, self.seq, kind, data))
        self.seq += 1

    # ---- the event loop ------------------------------------------------------------------------
    def run(self) -> tuple[np.ndarray, float, dict[str, Any]]:
        t, heap, queue = self.t, self.heap, self.queue
        i, n_req = 0, len(t)
        while i < n_req or heap:
            if heap and (i >= n_req or heap[0][0] <= t[i]):
                ev = heapq.heappop(heap)
                now = ev[0]
                queue.tick(now)
                self.handle(ev)
            else:
                now = float(t[i])
                queue.tick(now)
                self.arrive(i, now)
                i += 1
                continue
            self.dispatch(now)
        if isinstance(queue, RRCQueue):
            self.sim.alpha_history = queue.alpha_history
        busy = sum(g.busy_s for g in self.gpus)
        self.counters["actions"] = self.branches
        return self.lat, busy, self.counters

    def arrive(self, i: int, now: float) -> None:
        f = int(self.fns[i])
        fq = self.fq[f]
        fq.append(i)
        if not self.running[f] and len(fq) == 1:
            self.queue.ready(f, now)
        self.dispatch(now)
        if fq and fq[-1] == i:
            self.counters["waits"] += 1

    def handle(self, ev: tuple) -> None:
        now, _, kind, data = ev
        if kind == _DONE:
            self.on_done(now, data)
        elif kind == _LANDED:
            self.on_landed(now, data)

    def on_done(self, now: float, data: Any) -> None:
        gi, i, f, tok = data
        g = self.gpus[gi]
        if tok != g.tok:
            return  # its copy's landing moved, and the completion with it
        g.busy_s += now - g.run_start
        g.cur = None
        if g.compute is not None:
            g.compute.stop()
        lat = self.lat
        lat[i] = now - self.t[i]
        self.queue.record(f, lat[i], self.sim.slo[f])
        self.running[f] = False
        g.busy = False
        self.n_idle += 1
        r = g.res.get(f)
        if r is not None:
            r.last_used = now
        if self.fq[f]:
            self.queue.ready(f, float(self.t[self.fq[f][0]]))

    def on_landed(self, now: float, data: Any) -> None:
        tr, version = data
        if version != tr.version:
            return
        tr.owner[1].ready_at = now
        if tr.owner[2] is not None:
            gi, f = tr.owner[2]
            r = self.gpus[gi].res.get(f)
            if r is not None:
                r.locks -= 1
        self.rerated(self.xfer.finish(tr, now))
        self.copies_into(tr.owner[0], now, -1)

    def copies_into(self, gi: int, now: float, delta: int) -> None:
        """A copy into GPU `gi` started moving (+1) or landed (-1): its running compute
        re-planned where copies slow it (`torpor.sim.physics.Compute`)."""
        g = self.gpus[gi]
        c = g.compute
        if c is None or not c.copies(now, delta) or not g.busy:
            return
        g.exec_end = c.end
        done = max(c.end, g.cur.ready_at) if g.cur is not None else c.end
        if done != g.done_at:
            g.done_at = done
            g.tok += 1
            self.push(done, _DONE, (*g.cur_data, g.tok))

    def rerated(self, trs: list) -> None:
        # copies whose landing moved: their residents, the GPU's activity, and a run waiting on one
        for tr in trs:
            gi, r = tr.owner[0], tr.owner[1]
            g = self.gpus[gi]
            r.ready_at = tr.end
            self.push(tr.end, _LANDED, (tr, tr.version))
            if g.cur is r:
                g.copy_until = tr.end
                done = max(g.exec_end, tr.end)
                if done != g.done_at:
                    g.done_at = done
                    g.tok += 1
                    self.push(done, _DONE, (*g.cur_data, g.tok))

    # ---- dispatch --------------------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        queue = self.queue
        while self.n_idle and len(queue):
            f = queue.pop()
            if not self.start(f, now):
                queue.ready(f, float(self.t[self.fq[f][0]]))
                return

    def plan_eviction(self, gi: int, f: int, now: float) -> list | None:
        g = self.gpus[gi]
        need = self.nbytes[f] - g.free
        if need <= 0:
            return []
        holders, cls = self.holders, self.cls
        return self.evict((ResidentView(k, r.nbytes, r.last_used, cls[k], holders[k],
                                        r.locks > 0 or r.ready_at > now) for k, r in g.res.items()), need)

    def choose(self, f: int, now: float) -> tuple[Placement, int, list] | None:
        """Where `f` runs (Algorithm 1, or a random idle GPU), the GPU's index and what it
        evicts there; None: no idle GPU can take it."""
        gpus, views = self.gpus, self.views
        for lv in self.landed:
            lv.now = now
        for g, v in zip(gpus, views):
            v.idle = not g.busy
            v.activity = ACT_IDLE if not g.busy else g.act if g.copy_until > now else ACT_LOCAL
        excluded: list[GpuView] = []
        try:
            while True:
                if self.policy == "random":
                    pl = random_placement(f, views, lambda n: int(self.pick_rng.integers(n)))
                else:
                    pl = algorithm1(f, views, self.nvlink_bw)
                if pl is None:
                    return None
                gi = self.by_name[pl.gpu]
                victims = [] if pl.action == "run" else self.plan_eviction(gi, f, now)
                if victims is not None:
                    return pl, gi, victims
                views[gi].idle = False  # locked residents fill it: try another idle GPU
                excluded.append(views[gi])
        finally:
            for v in excluded:
                v.idle = True

    def start(self, f: int, now: float) -> bool:
        """Dispatch `f`'s next request where `choose` puts it; False: nowhere now."""
        chosen = self.choose(f, now)
        if chosen is None:
            return False
        pl, gi, victims = chosen
        self.branches[pl.branch] = self.branches.get(pl.branch, 0) + 1
        g = self.gpus[gi]
        i = self.fq[f].popleft()
        self.running[f] = True
        ex = self.sim.exec_s[f] * self.noise[i]
        g.cur = None
        moved_trs: list = []
        tr = None
        c = g.compute
        if pl.action == "run":
            r = g.res[f]
            done = now + ex if c is None else c.start(now, now, ex)
            g.exec_end = done
            g.copy_until = now
            g.act = ACT_LOCAL
        else:
            r, tr, moved_trs, first = self.copy_in(gi, f, pl, victims, now, i)
            g.exec_end = now + first + ex if c is None else c.start(now, now + first, ex)
            g.cur = r
            done = max(g.exec_end, tr.end)
        r.last_used = now
        g.busy = True
        self.n_idle -= 1
        g.run_start = now
        g.done_at = done
        g.cur_data = (gi, i, f)
        g.tok += 1
        if g.cur is r:  # before its completion: at a tie the link frees first, as it always has
            self.push(r.ready_at, _LANDED, (tr, tr.version))
        self.push(done, _DONE, (gi, i, f, g.tok))
        self.rerated([x for x in moved_trs if x.owner[1] is not r])
        return True

    def copy_in(self, gi: int, f: int, pl: Placement, victims: list, now: float, i: int
                ) -> tuple[_Res, Any, list, float]:
        """The victims evicted from GPU `gi` and `f`'s copy for request `i` started there (from
        the peer `pl.source`, else the host): its resident, its transfer, every copy whose
        landing moved, and the seconds its first group takes."""
        g, counters, nbytes = self.gpus[gi], self.counters, self.nbytes
        for v in victims:
            g.free += g.res.pop(v).nbytes
            self.holders[v] -= 1
        counters["evictions"] += len(victims)
        if pl.action == "peer":
            path = self.links.peer_path(pl.source, g.name)
            g.act = ACT_NVLINK
            counters["peers"] += 1
        else:
            path = self.links.host_path(g.name)
            g.act = host_activity(self.cls[f])
            counters["swaps"] += 1
        # the first group at the share the copy starts with (it lands in well under 1 ms), at
        # the true bandwidths and this request's jitter
        scale = 1.0 if self.copy_x is None else float(self.copy_x[i])
        first = self.cost.transfer_seconds(self.first_b[f] * scale, path, self.inflight)
        r = _Res(nbytes[f], now, now)
        src = None
        if pl.action == "peer":
            src = (self.by_name[pl.source], f)
            self.gpus[src[0]].res[f].locks += 1  # until the copy lands
        tr, moved_trs = self.xfer.start(now, nbytes[f], path, (gi, r, src), scale=scale)
        self.copies_into(gi, now, 1)
        r.ready_at = tr.end
        g.res[f] = r
        g.free -= nbytes[f]
        self.holders[f] += 1
        counters["moved"] += nbytes[f]
        g.copy_until = tr.end
        return r, tr, moved_trs, first
