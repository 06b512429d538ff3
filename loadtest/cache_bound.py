"""How few copies any online scheduler could make on the paper's node: the four GPUs' model
budget taken as one cache, every miss a copy of the whole model from host, on the arrivals
`paper_eval.py` replays (the prototype's sender over the paper's trace).

The prototype gives each arrival of a minute to a function drawn independently with probability
proportional to that function's count in that minute, so within a minute the request stream is
the independent reference model: the past says nothing about which function comes next beyond
those probabilities. Under it the best a cache can do without seeing the future is keep the most
probable models (Aho, Denning and Ullman's A0). `oracle-rate` does that with the TRUE per-minute
counts, which no server has (it must learn rates from arrivals); it bounds what better rate
learning could gain; `oracle-count` keeps the most probable per byte instead (fewest copies,
not fewest bytes). `belady` evicts the model needed furthest in the future, which needs the
arrival times themselves: what only foresight would gain. `lru` and `decayed` (the server's
eviction score, `torpor.scheduling.eviction.CostAwarePolicy` over its 60 s `RateMeter`, which
on one link orders by rate; without the reload-risk weight the simulator's scheduler adds for
models whose copy takes most of their objective) are online rules.

A pooled cache is kinder than four GPUs (no model is split from its neighbours by a full GPU),
so every count here is a floor for that rule, not what the simulator's scheduler makes.

    python loadtest/cache_bound.py --functions 640 --seeds 1-5 [--json F]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torpor.scheduling.eviction import Candidate, CostAwarePolicy, RateMeter
from torpor.sim.paper_sim import load_paper_scenario
from torpor.sim.workload import TRACE_MINUTE_S, load_trace, prototype_arrivals_by_minute, trace_counts

V100 = ROOT / "loadtest" / "scenarios" / "paper_v100.json"
RULES = ("lru", "decayed", "oracle-rate", "oracle-count", "belady")


def replay(rule: str, t: np.ndarray, fn: np.ndarray, minute: np.ndarray, size: np.ndarray, counts: np.ndarray,
           capacity: int, tau: float = 60.0) -> np.ndarray:
    """Which requests missed (their model copied in) under `rule`."""
    n = len(t)
    nxt = np.full(n, math.inf)  # belady: when each request's function is next requested
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        f = int(fn[i])
        if f in last:
            nxt[i] = t[last[f]]
        last[f] = i
    resident: dict[int, float] = {}  # function -> its key at its last use (lru, belady)
    meters: dict[int, RateMeter] = {}
    cost = CostAwarePolicy()
    used = 0
    miss = np.zeros(n, bool)

    def prio(f: int, now: float, m: int) -> Any:  # lowest goes first
        if rule == "lru":
            return resident[f]
        if rule == "decayed":  # the server's score over one link (reload = bytes / one bandwidth), LRU on ties
            c = Candidate(f, int(size[f]), resident[f], meters[f].rate(now), float(size[f]) / 1e9)
            return cost.score(c), resident[f]
        if rule == "oracle-rate":
            return float(counts[f, m])
        if rule == "oracle-count":
            return float(counts[f, m]) / float(size[f])
        return -resident[f]  # belady: furthest next use first

    for i in range(n):
        f, now, m = int(fn[i]), float(t[i]), int(minute[i])
        meter = meters.get(f)
        if meter is None:
            meter = meters[f] = RateMeter(tau)
        meter.hit(now)
        if f not in resident:
            miss[i] = True
            need = int(size[f])
            if used + need > capacity:
                heap = [(prio(g, now, m), g) for g in resident]
                heapq.heapify(heap)
                while used + need > capacity:
                    _, g = heapq.heappop(heap)
                    used -= int(size[g])
                    del resident[g]
            used += need
        resident[f] = nxt[i] if rule == "belady" else now
    return miss


def peak_rate(t: np.ndarray, nbytes: np.ndarray, t0: float, window: float = 120.0) -> float:
    """The most bytes per second copied over any `window` seconds from `t0` on (10 s steps)."""
    best = 0.0
    for start in np.arange(t0, max(t0, t[-1] - window) + 1e-9, 10.0):
        sel = (t >= start) & (t < start + window)
        best = max(best, float(nbytes[sel].sum()) / window)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--functions", type=int, default=640)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds measured (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before, not counted (default %(default)s)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    sc, _ = load_paper_scenario(V100, functions=args.functions)
    size = np.array([sc.models[f % len(sc.models)].nbytes for f in range(args.functions)], dtype=np.int64)
    capacity = int(sc.gpus * sc.weight_budget)
    trace = load_trace()
    minutes = math.ceil((args.duration + args.warmup) / TRACE_MINUTE_S)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)  # as torpor.sim.workload.make_arrivals draws them
        counts = trace_counts(trace, args.functions, minutes, rng)
        t, fn, minute = prototype_arrivals_by_minute(counts, rng)  # the simulator's arrivals
        keep = t < args.duration + args.warmup
        t, fn, minute = t[keep], fn[keep], minute[keep]
        measured = t >= args.warmup
        for rule in RULES:
            miss = replay(rule, t, fn, minute, size, counts, capacity)
            moved = np.where(miss, size[fn], 0)
            rows.append({"seed": seed, "rule": rule, "requests": int(measured.sum()),
                         "copies": int((miss & measured).sum()),
                         "GB": float(moved[measured].sum()) / 1e9,
                         "peak_GBps": peak_rate(t, moved, args.warmup) / 1e9})
    print(f"{args.functions} functions, {capacity / 1e9:.0f} GB of model budget as one cache, "
          f"{args.duration:.0f} s measured after {args.warmup:.0f} s, seeds {args.seeds}")
    print(f"{'rule':12} {'copies':>16} {'GB copied':>16} {'busiest 120 s, GB/s':>22}")
    for rule in RULES:
        rs = [r for r in rows if r["rule"] == rule]

        def med(k: str, rs: list = rs) -> str:
            v = sorted(r[k] for r in rs)
            return f"{np.median(v):.1f} ({v[0]:.1f}-{v[-1]:.1f})" if k != "copies" else \
                f"{int(np.median(v))} ({v[0]}-{v[-1]})"
        print(f"{rule:12} {med('copies'):>16} {med('GB'):>16} {med('peak_GBps'):>22}")
    if args.json:
        Path(args.json).write_text(json.dumps({"functions": args.functions, "seeds": seeds, "capacity_bytes": capacity,
                                               "duration_s": args.duration, "warmup_s": args.warmup,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
