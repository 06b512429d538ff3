"""Ours in the simulator with every function's TRUE per-minute rate in place of its rate meter:
what perfect rate learning would buy the eviction order on the paper's node (the upper bound
`cache_bound.py` estimates from bytes, run here through the whole scheduler and its physics).

No server knows these rates; this is a bound, not a policy. The meter's place is taken per
function (`Simulation.rates`), everything else is as `paper_eval.py` runs ours: prototype
arrivals over the paper's trace, 60 s warm-up then 600 s measured, processor-sharing links.

    python loadtest/oracle_rates.py --seeds 11-15 --counts 620,640 [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torpor.sim.paper_sim import compliance, load_paper_scenario
from torpor.sim.simulation import Simulation
from torpor.sim.workload import load_trace, prototype_arrivals_by_minute, trace_counts

V100 = ROOT / "loadtest" / "scenarios" / "paper_v100.json"
WARMUP_S, DURATION_S = 60.0, 660.0


class TrueRate:
    """A rate meter that knows its function's count in the minute the latest arrival came from."""

    def __init__(self, f: int, counts: np.ndarray, t: np.ndarray, minute: np.ndarray):
        self.f, self.counts, self.t, self.minute = f, counts, t, minute

    def hit(self, now: float) -> None:
        pass

    def rate(self, now: float) -> float:
        i = max(0, int(np.searchsorted(self.t, now, side="right")) - 1)
        return float(self.counts[self.f, self.minute[i]]) / 60.0


def run(job: tuple[str, int, int]) -> dict:
    rates, seed, n = job
    sc, _ = load_paper_scenario(V100, functions=n, seed=seed,
                                workload={"kind": "trace", "duration_s": DURATION_S, "arrivals": "prototype"})
    rng = np.random.default_rng(seed)  # the draws torpor.sim.workload.make_arrivals makes
    counts = trace_counts(load_trace(), n, int(np.ceil(DURATION_S / 60)), rng)
    t, fn, minute = prototype_arrivals_by_minute(counts, rng)
    keep = t < DURATION_S
    t, fn, minute = t[keep], fn[keep], minute[keep]
    sim = Simulation(sc, "torpor", link_physics="shared")
    if rates == "true":
        for f in range(n):
            sim.rates[f] = TrueRate(f, counts, t, minute)
    r = sim.run(t, fn, DURATION_S)
    measured = t >= WARMUP_S
    slo = np.array([sc.models[f % len(sc.models)].slo_s for f in range(n)])
    c = compliance(sim.latency[measured], fn[measured], slo)
    return {"rates": rates, "seed": seed, "functions": n, "compliant_frac": c["compliant"] / c["functions"],
            "swaps": r.swaps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="11-15")
    ap.add_argument("--counts", default="620,640")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    counts = [int(c) for c in args.counts.split(",")]
    jobs = [(v, s, n) for n in counts for s in seeds for v in ("meter", "true")]
    with ProcessPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(run, jobs))
    print("functions compliant (%), ours with its 60 s rate meter against ours knowing each minute's true rates")
    print(f"{'functions':>9} {'seed':>4} {'meter':>7} {'true':>7} {'swaps meter':>12} {'swaps true':>11}")
    for n in counts:
        for s in seeds:
            m, tr = (next(r for r in rows if (r["rates"], r["seed"], r["functions"]) == (v, s, n))
                     for v in ("meter", "true"))
            print(f"{n:>9} {s:>4} {100 * m['compliant_frac']:>7.1f} {100 * tr['compliant_frac']:>7.1f} "
                  f"{m['swaps']:>12} {tr['swaps']:>11}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "counts": counts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
