"""Reproduce the Torpor paper's single-node evaluation in the simulator, the paper's policies
beside ours (issue 11), and measure the comparison over seeds (issue 18). Each experiment prints
a table and writes JSON and a PNG:

    python loadtest/paper_eval.py latency     # (a) per-model latency: simulator vs the paper's Table 4
    python loadtest/paper_eval.py resnet152   # (b) 160 ResNet-152 functions: paper, native, keepalive, torpor
    python loadtest/paper_eval.py mix         # (c) eight-model mix, 320..800 functions, every policy
    python loadtest/paper_eval.py h100        # (d) the same sweep on a 4 x H100 node
    python loadtest/paper_eval.py capacity    # (e) ours vs the paper's policy over seeds 1-5, every 20 functions
    python loadtest/paper_eval.py all         # (a) to (d)

Options: --trace PATH (the paper's trace; default ../shared/data/ beside the project, and the
synthetic generator with the trace's statistics when it is absent or with --synthetic),
--arrivals prototype|poisson (how each minute's count becomes arrivals, `torpor.sim.workload`:
the authors' prototype's nearly regular process, the default, or exponential gaps), --seed,
--duration (seconds measured, default 600), --warmup (seconds of arrivals before, not counted,
default 60: the paper warms every function before measuring), --full-trace (the trace's whole
31 minutes: the warm-up, then the rest measured), --out (default docs/paper), --jobs (worker
processes, default 2), --links fixed|shared (the link physics of both simulators; default
`torpor.sim.physics`'s, TORPOR_SIM_LINKS), --policies and --counts (a subset of a sweep's
policies and function counts, comma-separated). The platform (the scenario's `copy_latency_ms`
and `request_overhead_ms`, overridden by --copy-latency-ms, --request-overhead-ms): a fixed
latency per copy (Table 4's swaps on V100, swap_bench's cold starts on H100) and a per-request
software overhead (the server's front end) that adds to every request's latency without holding a GPU. Error settings for the
simulators: --errors (`jitter=0.1,bandwidth_factor=0.8`, `torpor.sim.errors`; default
TORPOR_SIM_ERRORS), recorded in the titles and the JSON.
`capacity`: --seeds (default 1-5), --node v100|h100, --step (default 20), --search grid|bisect
(every point, or each seed's threshold by bisection and both policies at every point either
visited), --counts LO:HI (the range searched).

Policies: `torpor` is ours (torpor.sim.simulation); `paper`, `fifo`, `random`, `lru`, `native`,
`keepalive` are the paper's system, ablations and baselines (torpor.sim.paper_sim). Every
policy sees the same arrivals and is judged by the same rule: a function is compliant when its
p98 latency is within its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torpor.scheduling.costmodel import CostModel
from torpor.sim.errors import ERRORS_ENV, errors_from_env
from torpor.sim.paper import CLASS_NAMES
from torpor.sim.paper_sim import PaperSim, compliance, latency_profile, load_paper_scenario
from torpor.sim.physics import link_physics_from_env
from torpor.sim.simulation import Simulation
from torpor.sim.workload import ARRIVALS, DEFAULT_TRACE, TRACE_MINUTE_S, scenario_arrivals

SCEN = ROOT / "loadtest" / "scenarios"
V100 = SCEN / "paper_v100.json"
H100 = SCEN / "paper_h100.json"
MIX_POLICIES = ["paper", "fifo", "random", "lru", "native", "keepalive", "torpor"]
MIX_SWEEP = list(range(320, 801, 80))
H100_POLICIES = ["paper", "native", "keepalive", "torpor"]
H100_SWEEP = list(range(800, 1441, 160))
TARGET = 0.99

# What the paper reports (background/torpor.md §4), for the tables and plots
PAPER_R152 = {"paper": {"executed": 160, "compliant": 160}, "native": {"executed": 72, "compliant": None},
              "keepalive": {"executed": 112, "compliant": 7}}
PAPER_MIX = {480: 1.0, 560: 0.8}  # all compliant at 480, "above 80%" at 560
TRACE_MINUTES = 31  # the trace's columns (../shared/data/README.md)



# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


def workload(args: Any) -> tuple[dict[str, Any], str | None]:
    """Arrivals over warm-up + measured time (the paper warms every function before measuring;
    requests arriving during the warm-up fill the GPUs and are not counted)."""
    trace = args.trace or (str(DEFAULT_TRACE) if DEFAULT_TRACE.exists() else None)
    kind = "synthetic" if args.synthetic or trace is None else "trace"
    return ({"kind": kind, "duration_s": args.warmup + args.duration, "warmup_s": args.warmup,
             "arrivals": args.arrivals}, (trace if kind == "trace" else None))


PLATFORM_FIELDS = ("copy_latency_ms", "request_overhead_ms")


def platform(args: Any, scenario: Path) -> dict[str, float]:
    """The platform every run of `scenario` uses, as the scenario parses it (its fields or the
    simulators' defaults) with the command line's overrides: what each job lays over the
    scenario file and its JSON records."""
    over = {k: float(v) for k in PLATFORM_FIELDS if (v := getattr(args, k, None)) is not None}
    sc, _ = load_paper_scenario(scenario, **over)
    return {"copy_latency_ms": sc.copy_latency_s * 1e3, "request_overhead_ms": sc.request_overhead_s * 1e3}


def describe(args: Any, wl: dict[str, Any]) -> str:
    """The run's settings, for table titles."""
    errs = os.environ.get(ERRORS_ENV)
    return (f"{wl['kind']}, {wl.get('arrivals', 'poisson')} arrivals, {args.duration:.0f} s after "
            f"{args.warmup:.0f} s warm-up, {'processor-sharing' if args.links == 'shared' else 'fixed-share'} links"
            f"{f', errors {errs}' if errs else ''}")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    wl = dict(job["workload"])
    warmup = wl.pop("warmup_s", 0.0)
    over = {"functions": job["functions"], "seed": job["seed"], "workload": wl, **job["platform"]}
    if job.get("models") is not None:
        over["models"] = job["models"]
    sc, extras = load_paper_scenario(job["scenario"], **over)
    overhead = sc.request_overhead_s  # already off every objective (Scenario); added back to latencies shown
    t, fn, duration = scenario_arrivals(sc, job["trace"])
    t0 = time.perf_counter()
    policy = job["policy"]
    if policy == "torpor":
        sim = Simulation(sc, "torpor", link_physics=job["links"])
    else:
        sim = PaperSim(sc, policy, extras, link_physics=job["links"])
    r = sim.run(t, fn, duration)
    lat = getattr(sim, "latency", None)
    slo = np.array([sc.models[f % len(sc.models)].slo_s for f in range(sc.functions)])
    if lat is None:  # an older simulator without per-request latencies: its own p98 count (no warm-up cut)
        n_fn = len(np.unique(fn))
        c = {"compliant": round(r.compliant_functions * n_fn), "functions": n_fn, "executed": None}
        att, p99 = r.attainment, r.p99_ms
    else:
        keep = t >= warmup
        lat, fn_k = lat[keep], fn[keep]
        c = compliance(lat, fn_k, slo)
        att = float(np.mean(lat <= slo[fn_k])) if len(lat) else 1.0
        fin = lat[np.isfinite(lat)] + overhead
        p99 = float(np.percentile(fin, 99) * 1e3) if fin.size else float("nan")
    return {
        "policy": policy, "seed": job["seed"], "requests": int(np.sum(t >= warmup)), **c,
        "functions": sc.functions, "active": c["functions"],  # active: functions with requests measured
        "compliant_frac": c["compliant"] / c["functions"] if c["functions"] else 1.0,
        "attainment": att, "p99_ms": p99, "swaps": r.swaps,
        "peer_copies": r.peer_copies, "gpu_busy": r.gpu_busy, "unserved": r.unserved,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def run_all(jobs: list[dict[str, Any]], n_jobs: int, runner: Any = None) -> list[dict[str, Any]]:
    """`runner` (default `run_one`; loadtest/cluster_sim.py passes its own) on every job, in
    `n_jobs` worker processes."""
    runner = runner or run_one
    # the slowest runs (ours, at the largest counts) first, so two workers finish together
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["policy"] != "torpor", -jobs[i]["functions"]))
    t0, out = time.perf_counter(), {}

    def done(i: int, r: dict[str, Any]) -> None:
        out[i] = r
        if len(jobs) >= 20 and (len(out) % 10 == 0 or len(out) == len(jobs)):  # progress, on stderr
            print(f"  {len(out)}/{len(jobs)} runs, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    if n_jobs <= 1:
        for i in order:
            done(i, runner(jobs[i]))
    else:
        with ProcessPoolExecutor(n_jobs) as ex:
            futs = {ex.submit(runner, jobs[i]): i for i in order}
            for f in as_completed(futs):
                done(futs[f], f.result())
    return [out[i] for i in range(len(jobs))]


def table(cols: list[str], rows: list[list[str]]) -> str:
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w[i]) if i else v.ljust(w[i]) for i, v in enumerate(vals))
    return "\n".join([line(cols), line(["-" * x for x in w]), *(line(r) for r in rows)])


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p


def write(out: Path, name: str, report: dict[str, Any], fig: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    fig.savefig(out / f"{name}.png", dpi=80)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")


# ------------------------------------------------------------------------------------------------
# (a) per-model latency
# ------------------------------------------------------------------------------------------------


def swap_profile(sc: Any, copy_latency_s: float) -> list[dict[str, float]]:
    """`latency_profile` (seconds) with the platform's latency per copy."""
    links = sc.links(sc.gpus)
    cost = CostModel(links, transfer_latency_s=copy_latency_s)
    fast = max(links.nvlink.items(), key=lambda kv: kv[1])[0] if links.nvlink else None
    out = []
    for m, prof in zip(sc.models, latency_profile(sc, links)):
        def swap(path: tuple[str, ...], m: Any = m, prof: dict[str, float] = prof) -> float:
            tr = cost.transfer_seconds(m.nbytes, path, {})
            first = cost.transfer_seconds(m.first_group_bytes, path, {})
            return max(first + prof["resident_s"], tr)

        out.append({**prof, "host_s": swap(links.host_path(links.devices[0])),
                    "peer_s": swap(links.peer_path(*fast)) if fast else float("nan")})
    return out


def exp_latency(args: Any) -> dict[str, Any]:
    sc, extras = load_paper_scenario(V100)
    plat = platform(args, V100)
    rows, data = [], []
    for prof, e in zip(swap_profile(sc, plat["copy_latency_ms"] / 1e3), extras):
        t4 = e.table4_ms or {}
        d = {"model": e.name, "class": CLASS_NAMES[e.cls], "paper": t4,
             "sim": {"resident": prof["resident_s"] * 1e3, "pcie": prof["host_s"] * 1e3,
                     "nvlink": prof["peer_s"] * 1e3}}
        data.append(d)
        rows.append([e.name, d["class"], f"{t4.get('native', float('nan')):.0f}",
                     f"{t4.get('resident', float('nan')):.0f}", f"{d['sim']['resident']:.1f}",
                     f"{t4.get('pcie', float('nan')):.0f}", f"{d['sim']['pcie']:.1f}",
                     f"{t4.get('nvlink', float('nan')):.0f}", f"{d['sim']['nvlink']:.1f}"])
    print("(a) per-model latency (ms) on the paper's V100 node: the paper's Table 4 vs the simulator "
          "(host swap over GPU 0's PCIe path, peer copy over a double NVLink pair, nothing else in flight; "
          f"{plat['copy_latency_ms']:g} ms per copy; the request overhead is not in Table 4's numbers)")
    print(table(["model", "class", "native", "resident", "sim", "PCIe swap", "sim", "NVLink swap", "sim"], rows))
    p = plt()
    fig, ax = p.subplots(figsize=(8, 3.6))
    x = np.arange(len(data))
    w = 0.2
    for k, (key, lab) in enumerate([("pcie", "PCIe swap"), ("nvlink", "NVLink swap")]):
        ax.bar(x + (2 * k - 1.5) * w, [d["paper"].get(key, 0) for d in data], w, label=f"paper, {lab}")
        ax.bar(x + (2 * k - 0.5) * w, [d["sim"][key] for d in data], w, label=f"simulator, {lab}")
    ax.plot(x, [d["paper"].get("resident", 0) for d in data], "k_", ms=18, mew=2, label="resident (both)")
    ax.set_xticks(x, [d["model"] for d in data], rotation=20, fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Per-model latency, V100: paper's Table 4 vs simulator", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    err = [d["sim"][k] - d["paper"][k] for d in data for k in ("pcie", "nvlink") if k in d["paper"]]
    print(f"simulator - paper over the {len(err)} swaps: mean {np.mean(err):+.1f} ms, mean absolute "
          f"{np.mean(np.abs(err)):.1f} ms, worst {max(err, key=abs):+.1f} ms")
    report = {"experiment": "latency", "scenario": str(V100.relative_to(ROOT)), "platform": plat, "models": data}
    write(Path(args.out), "latency", report, fig)
    return report


# ------------------------------------------------------------------------------------------------
# (b) 160 ResNet-152 functions
# ------------------------------------------------------------------------------------------------


def exp_resnet152(args: Any) -> dict[str, Any]:
    spec = json.loads(V100.read_text())
    r152 = [m for m in spec["models"] if m["name"] == "resnet152"]
    wl, trace = workload(args)
    policies = ["paper", "native", "keepalive", "torpor"]
    plat = platform(args, V100)
    jobs = [{"scenario": str(V100), "functions": 160, "seed": args.seed, "workload": wl, "trace": trace,
             "models": r152, "policy": p, "links": args.links, "platform": plat} for p in policies]
    res = run_all(jobs, args.jobs)
    rows = []
    for r in res:
        pr = PAPER_R152.get(r["policy"], {})
        rows.append([r["policy"], str(r["executed"]), str(r["compliant"]),
                     "-" if not pr else f"{pr['executed']} / {pr['compliant'] if pr['compliant'] is not None else '-'}",
                     f"{r['attainment']:.2%}", f"{r['p99_ms']:.0f}", f"{r['wall_s']:.1f}"])
    print(f"(b) 160 ResNet-152 functions on the V100 node ({describe(args, wl)}, seed {args.seed}, "
          f"{res[0]['requests']} requests)")
    print(table(["policy", "executed", "compliant", "paper: exec / compl", "requests in SLO", "p99 ms", "wall s"],
                rows))
    p = plt()
    fig, ax = p.subplots(figsize=(6, 3.4))
    x = np.arange(len(res))
    ax.bar(x - 0.2, [r["executed"] for r in res], 0.4, label="executed (simulator)", color="#9ecae1")
    ax.bar(x + 0.2, [r["compliant"] for r in res], 0.4, label="compliant (simulator)", color="#3182bd")
    for i, r in enumerate(res):
        pr = PAPER_R152.get(r["policy"])
        if pr:
            ax.plot(i - 0.2, pr["executed"], "kx", ms=8)
            if pr["compliant"] is not None:
                ax.plot(i + 0.2, pr["compliant"], "kx", ms=8)
    ax.plot([], [], "kx", label="paper reports")
    ax.set_xticks(x, [r["policy"] for r in res])
    ax.set_ylabel("functions (of 160)")
    ax.set_title("160 ResNet-152 functions, 4 x V100 (p98 within 80 ms)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    report = {"experiment": "resnet152", "workload": wl, "seed": args.seed, "links": args.links,
              "platform": plat, "errors": os.environ.get(ERRORS_ENV), "results": res,
              "paper_reports": PAPER_R152}
    write(Path(args.out), "resnet152", report, fig)
    return report


# ------------------------------------------------------------------------------------------------
# (c), (d) sweeps
# ------------------------------------------------------------------------------------------------


def compliance_axes(ax: Any, fig: Any, title: str) -> None:
    """Labels, the 99% line and the legend of a compliant-functions plot."""
    ax.axhline(TARGET * 100, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("functions")
    ax.set_ylabel("compliant functions (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()


def capacity(res: list[dict[str, Any]], policy: str) -> int | None:
    """The largest function count at which `policy` keeps >= 99% of functions compliant (all
    smaller counts too)."""
    best = None
    for r in sorted((r for r in res if r["policy"] == policy), key=lambda r: r["functions"]):
        if r["compliant_frac"] >= TARGET:
            best = r["functions"]
        else:
            break
    return best


def sweep(args: Any, name: str, scenario: Path, counts: list[int], policies: list[str], title: str,
          paper_marks: dict[int, float] | None) -> dict[str, Any]:
    wl, trace = workload(args)
    if getattr(args, "policies", None):
        policies = [p for p in args.policies.split(",") if p]
    if getattr(args, "counts", None):
        counts = [int(n) for n in args.counts.split(",") if n]
    plat = platform(args, scenario)
    jobs = [{"scenario": str(scenario), "functions": n, "seed": args.seed, "workload": wl, "trace": trace,
             "policy": p, "links": args.links, "platform": plat} for n in counts for p in policies]
    res = run_all(jobs, args.jobs)
    by = {(r["functions"], r["policy"]): r for r in res}
    rows = [[str(n), *(f"{by[(n, p)]['compliant_frac']:.1%}" for p in policies)] for n in counts]
    caps = {p: capacity(res, p) for p in policies}
    rows.append([">=99% up to", *("-" if caps[p] is None else str(caps[p]) for p in policies)])
    print(f"({name}) fraction of functions compliant (p98 within deadline), {title} "
          f"({describe(args, wl)}, seed {args.seed})")
    print(table(["functions", *policies], rows))
    ours, theirs = caps.get("torpor"), caps.get("paper")
    ratio = (ours / theirs) if ours and theirs else None
    never_below = (all(by[(n, "torpor")]["compliant"] >= by[(n, "paper")]["compliant"] for n in counts)
                   if {"torpor", "paper"} <= set(policies) else None)
    print(f"torpor vs paper: largest count with >=99% compliant {ours} vs {theirs}"
          f"{f' ({ratio:.2f}x)' if ratio else ''}; at least as many compliant at every point: {never_below}")
    p = plt()
    fig, ax = p.subplots(figsize=(6.4, 3.6))
    style = {"torpor": {"color": "C3", "lw": 2.5, "marker": "o"}, "paper": {"color": "C0", "lw": 2, "marker": "s"}}
    for pol in policies:
        ys = [by[(n, pol)]["compliant_frac"] * 100 for n in counts]
        ax.plot(counts, ys, label=pol if pol != "torpor" else "torpor (ours)",
                **style.get(pol, {"lw": 1, "marker": ".", "ls": "--"}))
    if paper_marks:
        ax.plot(list(paper_marks), [v * 100 for v in paper_marks.values()], "kx", ms=9, mew=2,
                label="paper reports (Torpor)")
    compliance_axes(ax, fig, f"{title}, {wl.get('arrivals', 'poisson')} arrivals")
    report = {"experiment": name, "scenario": str(scenario.relative_to(ROOT)), "workload": wl, "seed": args.seed,
              "counts": counts, "policies": policies, "links": args.links, "platform": plat,
              "errors": os.environ.get(ERRORS_ENV), "results": res, "capacity_99": caps,
              "torpor_over_paper": ratio, "torpor_never_fewer": never_below}
    write(Path(args.out), name, report, fig)
    return report


def exp_mix(args: Any) -> dict[str, Any]:
    return sweep(args, "mix", V100, MIX_SWEEP, MIX_POLICIES, "Eight-model mix, 4 x V100 (paper's node)", PAPER_MIX)


def exp_h100(args: Any) -> dict[str, Any]:
    return sweep(args, "h100", H100, H100_SWEEP, H100_POLICIES, "Eight-model mix, 4 x H100 (PCIe 5, NVLink 4)",
                 None)


# ------------------------------------------------------------------------------------------------
# (e) ours against the paper's policy over seeds
# ------------------------------------------------------------------------------------------------

NODES = {"v100": V100, "h100": H100}
CAPACITY_RANGE = {"v100": (440, 720), "h100": (1000, 1560)}  # default range searched, every --step functions


def parse_seeds(text: str) -> list[int]:
    """`1-5`, `1,2,7` or a mix."""
    out: list[int] = []
    for part in (x for x in text.split(",") if x):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def capacity_points(args: Any) -> list[int]:
    if args.counts and ":" not in args.counts:
        return sorted(int(n) for n in args.counts.split(",") if n)
    lo, hi = CAPACITY_RANGE[args.node]
    if args.counts:
        a, _, b = args.counts.partition(":")
        lo, hi = int(a), int(b)
    return list(range(lo, hi + 1, args.step))


def search(args: Any, base: dict[str, Any], seeds: list[int], points: list[int], policies: list[str],
           runner: Any = None, fill: bool = True) -> list[dict[str, Any]]:
    """Every (seed, point, policy) with --search grid. With bisect: each (seed, policy)'s largest
    point at >= 99% by bisection over `points` (compliance taken as falling with the count),
    then (with `fill`), per seed, every policy at every point any visited, so that they are
    compared on the same points. `runner`: as `run_all`'s."""
    def job(s: int, n: int, p: str) -> dict[str, Any]:
        return {**base, "seed": s, "functions": n, "policy": p}

    if args.search == "grid":
        return run_all([job(s, n, p) for s in seeds for n in points for p in policies], args.jobs, runner)
    res: dict[tuple[int, int, str], dict[str, Any]] = {}
    bounds = {(s, p): [-1, len(points)] for s in seeds for p in policies}  # last index >= 99%, first below
    while todo := {k: (ok + bad) // 2 for k, (ok, bad) in bounds.items() if bad - ok > 1}:
        for ((s, p), i), r in zip(todo.items(), run_all([job(s, points[i], p) for (s, p), i in todo.items()],
                                                         args.jobs, runner)):
            res[(s, points[i], p)] = r
            bounds[(s, p)][0 if r["compliant_frac"] >= TARGET else 1] = i
    missing = sorted({(s, n, p) for (s, n, _) in res for p in policies} - set(res)) if fill else []
    for k, r in zip(missing, run_all([job(*k) for k in missing], args.jobs, runner)):
        res[k] = r
    return list(res.values())


def spread(values: list[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that are there (None: below the range searched)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "missing": len(values)}
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "missing": len(values) - len(v)}


def exp_capacity(args: Any) -> dict[str, Any]:
    scenario = NODES[args.node]
    wl, trace = workload(args)
    seeds, points, policies = parse_seeds(args.seeds), capacity_points(args), ["paper", "torpor"]
    plat = platform(args, scenario)
    base = {"scenario": str(scenario), "workload": wl, "trace": trace, "links": args.links, "platform": plat}
    res = search(args, base, seeds, points, policies)
    per_seed = []
    for s in seeds:
        rs = [r for r in res if r["seed"] == s]
        caps = {p: capacity(rs, p) for p in policies}
        by = {(r["functions"], r["policy"]): r for r in rs}
        both = sorted(n for n in {r["functions"] for r in rs} if all((n, p) in by for p in policies))
        per_seed.append({"seed": s, "capacity_99": caps,
                         "ratio": caps["torpor"] / caps["paper"] if caps["torpor"] and caps["paper"] else None,
                         "torpor_never_fewer": all(by[(n, "torpor")]["compliant"] >= by[(n, "paper")]["compliant"]
                                                   for n in both),
                         "points": both})
    summary = {p: spread([d["capacity_99"][p] for d in per_seed]) for p in policies}
    summary["ratio"] = spread([d["ratio"] for d in per_seed])
    never_fewer = all(d["torpor_never_fewer"] for d in per_seed)
    name = f"{args.node} x 4, {len(seeds)} seeds ({args.seeds}), every {args.step} functions {points[0]}-{points[-1]}"
    print(f"(e) largest function count with >= 99% of functions compliant (this count and every smaller one "
          f"run), paper's policy vs ours, {name} ({describe(args, wl)}; {args.search} search)")
    cap = lambda v: "-" if v is None else str(v)
    rows = [[str(d["seed"]), cap(d["capacity_99"]["paper"]), cap(d["capacity_99"]["torpor"]),
             "-" if d["ratio"] is None else f"{d['ratio']:.2f}x", "yes" if d["torpor_never_fewer"] else "NO"]
            for d in per_seed]
    fmt = lambda x, f: "-" if x is None else f.format(x)
    rows.append(["median", *(fmt(summary[p]["median"], "{:.0f}") for p in policies),
                 fmt(summary["ratio"]["median"], "{:.2f}x"), "yes" if never_fewer else "NO"])
    rows.append(["min-max", *(f"{fmt(summary[p]['min'], '{:.0f}')}-{fmt(summary[p]['max'], '{:.0f}')}"
                              for p in policies),
                 f"{fmt(summary['ratio']['min'], '{:.2f}')}-{fmt(summary['ratio']['max'], '{:.2f}x')}", ""])
    print(table(["seed", "paper", "torpor (ours)", "ours / paper", "ours >= paper at every point"], rows))
    print("('-': below the range searched; the ratio's median is the median of the per-seed ratios)")
    fracs = {(r["seed"], r["functions"], r["policy"]): r["compliant_frac"] for r in res}
    pts = sorted({r["functions"] for r in res})
    prow = []
    for n in pts:
        cells = []
        for p in policies:
            v = [fracs[(s, n, p)] * 100 for s in seeds if (s, n, p) in fracs]
            cells.append(f"{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "")
        prow.append([str(n), *cells])
    print("compliant functions (%) per point, median (min-max) over the seeds run there:")
    print(table(["functions", "paper", "torpor (ours)"], prow))
    p_ = plt()
    fig, ax = p_.subplots(figsize=(6.4, 3.6))
    for pol, color in (("paper", "C0"), ("torpor", "C3")):
        for i, s in enumerate(seeds):
            xs = [n for n in pts if (s, n, pol) in fracs]
            ax.plot(xs, [fracs[(s, n, pol)] * 100 for n in xs], color=color, lw=1, marker=".", alpha=0.7,
                    label=(pol if pol != "torpor" else "torpor (ours)") if i == 0 else None)
    compliance_axes(ax, fig, f"{args.node.upper()} x 4, seeds {args.seeds}, {wl.get('arrivals', 'poisson')} arrivals")
    report = {"experiment": "capacity", "scenario": str(scenario.relative_to(ROOT)), "workload": wl,
              "seeds": seeds, "points": points, "step": args.step, "search": args.search, "links": args.links,
              "platform": plat, "errors": os.environ.get(ERRORS_ENV), "per_seed": per_seed,
              "summary": summary, "torpor_never_fewer": never_fewer, "results": res}
    write(Path(args.out), f"capacity-{args.node}", report, fig)
    return report


EXPERIMENTS = {"latency": exp_latency, "resnet152": exp_resnet152, "mix": exp_mix, "h100": exp_h100,
               "capacity": exp_capacity}
ALIASES = {"a": "latency", "b": "resnet152", "c": "mix", "d": "h100", "e": "capacity"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=[*EXPERIMENTS, *ALIASES, "all"])
    ap.add_argument("--trace", default=None, help="the paper's trace .npy (default: ../shared/data/ if present)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic generator even if the trace is there")
    ap.add_argument("--arrivals", choices=ARRIVALS, default="prototype",
                    help="each minute's count as the authors' prototype sends it (exactly, with Poisson "
                         "whole-ms gaps) or with exponential gaps (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds measured (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of arrivals before measuring, not counted (default %(default)s)")
    ap.add_argument("--full-trace", action="store_true",
                    help=f"run the trace's whole {TRACE_MINUTES} minutes: the warm-up, the rest measured")
    ap.add_argument("--copy-latency-ms", type=float, default=None,
                    help="fixed latency per copy (default: the scenario's copy_latency_ms)")
    ap.add_argument("--request-overhead-ms", type=float, default=None,
                    help="per-request software overhead beside the GPU (default: the scenario's request_overhead_ms)")
    ap.add_argument("--errors", default=None,
                    help="prediction error for both simulators, e.g. jitter=0.1,bandwidth_factor=0.8 "
                         "(torpor.sim.errors; sets TORPOR_SIM_ERRORS for the runs; default: that variable)")
    ap.add_argument("--seeds", default="1-5", help="capacity: seeds, e.g. 1-5 or 1,2,7 (default %(default)s)")
    ap.add_argument("--node", choices=list(NODES), default="v100", help="capacity: the node (default %(default)s)")
    ap.add_argument("--step", type=int, default=20, help="capacity: functions between points (default %(default)s)")
    ap.add_argument("--search", choices=["grid", "bisect"], default="grid",
                    help="capacity: every point, or each seed's threshold by bisection (default %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "paper"))
    ap.add_argument("--links", choices=["fixed", "shared"], default=None,
                    help="link physics: fixed shares (a copy keeps the share it started with) or processor "
                         "sharing; default: TORPOR_SIM_LINKS, else torpor.sim.physics's default")
    ap.add_argument("--policies", default=None,
                    help="comma-separated subset of the sweep's policies (default: all)")
    ap.add_argument("--counts", default=None,
                    help="comma-separated function counts (default: the sweep's); capacity also LO:HI")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    args.links = args.links or link_physics_from_env()
    if args.errors is not None:
        os.environ[ERRORS_ENV] = args.errors  # read by load_paper_scenario in every worker
    try:
        errors_from_env()
    except ValueError as e:
        ap.error(str(e))
    if args.full_trace:
        args.duration = TRACE_MINUTES * TRACE_MINUTE_S - args.warmup
    names = [n for n in EXPERIMENTS if n != "capacity"] if args.experiment == "all" else [ALIASES.get(args.experiment, args.experiment)]
    t0 = time.perf_counter()
    for n in names:
        EXPERIMENTS[n](args)
        print()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
