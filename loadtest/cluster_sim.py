"""The paper's six-node scale-out in the simulator's multi-node mode (issue 22, item 6): N nodes
of the paper's 4 x V100 node behind a front router, our residency-aware routing against round
robin and consistent hashing (`torpor.sim.cluster`). Each experiment prints a table and writes JSON:

    python loadtest/cluster_sim.py point --functions 3000          # every routing at one count, one seed
    python loadtest/cluster_sim.py capacity --seeds 11-15          # the largest count at >= 99% compliant

`capacity` is paper_eval.py's capacity search with routings in place of policies: per seed and
routing, the largest function count whose functions are >= 99% compliant (p98 within the
deadline, measured after the warm-up, as paper_eval counts it), by bisection over --counts
LO:HI every --step functions (or every point with --search grid); then median and min-max
over the seeds. Options shared with paper_eval.py: --trace, --synthetic, --arrivals,
--duration, --warmup, --links, --jobs, --copy-latency-ms, --request-overhead-ms (the V100
platform's: the scenario's copy_latency_ms and request_overhead_ms). Here also: --nodes (default 6), --routings (comma-separated, default
all three), --deadlines-ms VISION,BERT (the paper's cluster ran 150,250; default the node's
80/200), --stop-below (a run is given up, and counted not compliant, once more requests have
missed than that attainment allows; default 0.9: far below what 99% of functions compliant
needs, so no verdict changes, and a collapsed run ends in seconds instead of many minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_eval import (
    V100,
    capacity,
    describe,
    parse_seeds,
    platform,
    run_all,
    search,
    spread,
    table,
    workload,
)

from torpor.sim.cluster import ROUTINGS, Cluster
from torpor.sim.paper_sim import compliance, load_paper_scenario
from torpor.sim.physics import link_physics_from_env
from torpor.sim.workload import ARRIVALS, scenario_arrivals

DEFAULT_RANGE = (1200, 4200)  # functions searched at 6 nodes: round robin's and ours' thresholds inside


def run_cluster(job: dict[str, Any]) -> dict[str, Any]:
    """One routing on one (seed, function count): paper_eval.run_one's counts, on a cluster."""
    wl = dict(job["workload"])
    warmup = wl.pop("warmup_s", 0.0)
    sc, _ = load_paper_scenario(job["scenario"], functions=job["functions"], seed=job["seed"], workload=wl,
                                **job["platform"])
    overhead = sc.request_overhead_s  # already off every objective (Scenario)
    if job.get("deadlines_ms"):  # the paper's cluster deadlines, less the front end's share
        vision, bert = job["deadlines_ms"]
        for m in sc.models:
            m.slo_s = (bert if "bert" in m.name.lower() else vision) / 1e3 - overhead
    t, fn, duration = scenario_arrivals(sc, job["trace"])
    cluster = Cluster(sc, job["nodes"], job["policy"], link_physics=job["links"], slo_factor=job.get("slo_factor"))
    r = cluster.run(t, fn, duration, stop_below=job.get("stop_below"))
    keep = t >= warmup
    lat, fn_k = cluster.latency[keep], fn[keep]
    slo = np.array([sc.models[f % len(sc.models)].slo_s for f in range(sc.functions)])
    c = compliance(lat, fn_k, slo)
    fin = lat[np.isfinite(lat)] + overhead
    return {
        "policy": job["policy"], "seed": job["seed"], "functions": sc.functions, "nodes": job["nodes"],
        "requests": int(keep.sum()), "compliant": c["compliant"], "active": c["functions"],
        "compliant_frac": c["compliant"] / c["functions"] if c["functions"] else 1.0,
        "attainment": float(np.mean(lat <= slo[fn_k])) if len(lat) else 1.0,
        "p99_ms": float(np.percentile(fin, 99) * 1e3) if fin.size else float("nan"),
        "hit_rate": r.hit_rate, "affinity": r.affinity, "max_node_share": max(r.node_share),
        "swaps": r.swaps, "peer_copies": r.peer_copies, "gpu_busy": r.gpu_busy, "stopped": r.stopped,
        "wall_s": round(r.wall_s, 2),
    }


def base_job(args: Any) -> dict[str, Any]:
    wl, trace = workload(args)
    if args.zipf:  # the synthetic generator, popularity skewed: a few functions far hotter than any in the trace
        wl, trace = {**wl, "kind": "synthetic", "zipf": args.zipf}, None
    return {"scenario": str(V100), "workload": wl, "trace": trace, "links": args.links,
            "platform": platform(args, V100), "nodes": args.nodes, "stop_below": args.stop_below,
            "deadlines_ms": args.deadlines_ms, "slo_factor": args.route_slo_factor}


def title(args: Any) -> str:
    wl = base_job(args)["workload"]
    dl = args.deadlines_ms or (80, 200)
    zipf = f", Zipf({wl['zipf']:g}) popularity" if "zipf" in wl else ""
    return (f"{args.nodes} nodes x 4 V100 (paper_v100), deadlines {dl[0]:g} / {dl[1]:g} ms; "
            f"{describe(args, wl)}{zipf}")


def report_out(args: Any, name: str, report: dict[str, Any]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def exp_point(args: Any) -> dict[str, Any]:
    base = base_job(args)
    jobs = [{**base, "seed": args.seed, "functions": args.functions, "policy": r} for r in args.routings]
    res = run_all(jobs, args.jobs, run_cluster)
    print(f"{args.functions} functions, seed {args.seed}: {title(args)}")
    rows = [[r["policy"], f"{r['compliant_frac']:.1%}", f"{r['attainment']:.2%}", f"{r['p99_ms']:.0f}",
             f"{r['hit_rate']:.1%}", f"{r['affinity']:.1%}", f"{r['max_node_share']:.1%}", str(r["swaps"]),
             "yes" if r["stopped"] else "", f"{r['wall_s']:.0f}"] for r in res]
    print(table(["routing", "functions compliant", "requests in SLO", "p99 ms", "device hits", "affinity",
                 "busiest node", "swaps", "stopped", "wall s"], rows))
    report = {"experiment": "point", "title": title(args), "job": {**base, "seed": args.seed,
              "functions": args.functions}, "results": res}
    report_out(args, f"cluster-point-{args.nodes}n-{args.functions}-s{args.seed}", report)
    return report


def exp_capacity(args: Any) -> dict[str, Any]:
    base = base_job(args)
    seeds = parse_seeds(args.seeds)
    lo, hi = DEFAULT_RANGE
    if args.counts:
        a, _, b = args.counts.partition(":")
        lo, hi = int(a), int(b)
    points = list(range(lo, hi + 1, args.step))
    res = search(args, base, seeds, points, args.routings, run_cluster, fill=False)
    per_seed = [{"seed": s, "capacity_99": {p: capacity([r for r in res if r["seed"] == s], p)
                                            for p in args.routings}} for s in seeds]
    summary = {p: spread([d["capacity_99"][p] for d in per_seed]) for p in args.routings}
    print(f"largest function count with >= 99% of functions compliant, {title(args)}; {args.search} search "
          f"over {lo}-{hi} every {args.step} functions, seeds {args.seeds}")
    cell = lambda v: "-" if v is None else f"{v:.0f}"
    rows = [[str(d["seed"]), *(cell(d["capacity_99"][p]) for p in args.routings)] for d in per_seed]
    rows.append(["median", *(cell(summary[p]["median"]) for p in args.routings)])
    rows.append(["min-max", *(f"{cell(summary[p]['min'])}-{cell(summary[p]['max'])}" for p in args.routings)])
    print(table(["seed", *args.routings], rows))
    print("('-': below the range searched)")
    prow = [[str(r["seed"]), str(r["functions"]), r["policy"], f"{r['compliant_frac']:.1%}",
             f"{r['hit_rate']:.1%}", f"{r['affinity']:.1%}", f"{r['max_node_share']:.1%}",
             "yes" if r["stopped"] else "", f"{r['wall_s']:.0f}"]
            for r in sorted(res, key=lambda r: (r["seed"], r["policy"], r["functions"]))]
    print(table(["seed", "functions", "routing", "compliant", "device hits", "affinity", "busiest node",
                 "stopped", "wall s"], prow))
    report = {"experiment": "capacity", "title": title(args), "seeds": seeds, "points": points, "step": args.step,
              "search": args.search, "job": base, "per_seed": per_seed, "summary": summary, "results": res}
    report_out(args, f"cluster-capacity-{args.nodes}n-{args.seeds}", report)
    return report


def parse_args(argv: list[str] | None) -> Any:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=["point", "capacity"])
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--routings", default=",".join(ROUTINGS), help="comma-separated (default %(default)s)")
    ap.add_argument("--functions", type=int, default=3000, help="point: the function count")
    ap.add_argument("--seed", type=int, default=1, help="point: the seed")
    ap.add_argument("--seeds", default="11-15", help="capacity: e.g. 11-15 or 1,2,7 (default %(default)s)")
    ap.add_argument("--counts", default=None, help=f"capacity: LO:HI (default {DEFAULT_RANGE[0]}:{DEFAULT_RANGE[1]})")
    ap.add_argument("--step", type=int, default=60, help="capacity: functions between points (default %(default)s)")
    ap.add_argument("--search", choices=["grid", "bisect"], default="bisect")
    ap.add_argument("--deadlines-ms", default=None, help="VISION,BERT deadlines (the paper's cluster: 150,250)")
    ap.add_argument("--stop-below", type=float, default=0.9)
    ap.add_argument("--route-slo-factor", type=float, default=None,
                    help="torpor routing: the objective routed with, as a multiple of the SLO (default: the "
                         "nodes' scheduler margin, 0.9; inf: none)")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--zipf", type=float, default=None,
                    help="the synthetic generator with Zipf(S) popularity over the functions instead of the trace")
    ap.add_argument("--arrivals", choices=ARRIVALS, default="prototype")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds measured (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before, not counted (default %(default)s)")
    ap.add_argument("--copy-latency-ms", type=float, default=None)
    ap.add_argument("--request-overhead-ms", type=float, default=None)
    ap.add_argument("--links", choices=["fixed", "shared"], default=None)
    ap.add_argument("--out", default=str(ROOT / "loadtest" / "measured"))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    args.links = args.links or link_physics_from_env()
    args.routings = [r for r in args.routings.split(",") if r]
    bad = [r for r in args.routings if r not in ROUTINGS]
    if bad:
        ap.error(f"--routings: unknown {bad}; expected some of {list(ROUTINGS)}")
    if args.deadlines_ms:
        try:
            vision, bert = (float(x) for x in args.deadlines_ms.split(","))
        except ValueError:
            ap.error(f"--deadlines-ms: expected VISION,BERT in ms, got {args.deadlines_ms!r}")
        args.deadlines_ms = (vision, bert)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    {"point": exp_point, "capacity": exp_capacity}[args.experiment](args)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
