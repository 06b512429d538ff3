"""Reproduce the Torpor paper's single-node evaluation in the simulator, the paper's policies
beside ours (issue 11). Each experiment prints a table and writes JSON and a PNG:

    python loadtest/paper_eval.py latency     # (a) per-model latency: simulator vs the paper's Table 4
    python loadtest/paper_eval.py resnet152   # (b) 160 ResNet-152 functions: paper, native, keepalive, torpor
    python loadtest/paper_eval.py mix         # (c) eight-model mix, 320..800 functions, every policy
    python loadtest/paper_eval.py h100        # (d) the same sweep on a 4 x H100 node
    python loadtest/paper_eval.py all         # all four (under 10 minutes on 2 cores)

Options: --trace PATH (the paper's trace; default ../shared/data/ beside the project, and the
synthetic generator with the trace's statistics when it is absent or with --synthetic), --seed,
--duration (seconds measured, default 600), --warmup (seconds of arrivals before, not counted,
default 60: the paper warms every function before measuring), --out (default docs/paper),
--jobs (worker processes, default 2), --links fixed|shared (the link physics of both simulators:
a copy keeps the share it started with, the default, or processor sharing; default from
TORPOR_SIM_LINKS), --policies and --counts (a subset of a sweep's policies and function counts,
comma-separated). Policies: `torpor` is ours (torpor.sim.simulation); `paper`,
`fifo`, `random`, `lru`, `native`, `keepalive` are the paper's system, ablations and baselines
(torpor.sim.paper_sim). Every policy sees the same arrivals and is judged by the same rule: a
function is compliant when its p98 latency is within its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torpor.sim.paper import CLASS_NAMES
from torpor.sim.paper_sim import PaperSim, compliance, latency_profile, load_paper_scenario
from torpor.sim.physics import link_physics_from_env
from torpor.sim.simulation import Simulation
from torpor.sim.workload import DEFAULT_TRACE, scenario_arrivals

SCEN = ROOT / "loadtest" / "scenarios"
V100 = SCEN / "paper_v100.json"
H100 = SCEN / "paper_h100.json"
MIX_POLICIES = ["paper", "fifo", "random", "lru", "native", "keepalive", "torpor"]
MIX_SWEEP = list(range(320, 801, 80))
H100_POLICIES = ["paper", "native", "keepalive", "torpor"]
H100_SWEEP = list(range(960, 1921, 160))
TARGET = 0.99

# What the paper reports (background/torpor.md §4), for the tables and plots
PAPER_R152 = {"paper": {"executed": 160, "compliant": 160}, "native": {"executed": 72, "compliant": None},
              "keepalive": {"executed": 112, "compliant": 7}}
PAPER_MIX = {480: 1.0, 560: 0.8}  # all compliant at 480, "above 80%" at 560


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


def workload(args: Any) -> tuple[dict[str, Any], str | None]:
    """Arrivals over warm-up + measured time (the paper warms every function before measuring;
    requests arriving during the warm-up fill the GPUs and are not counted)."""
    trace = args.trace or (str(DEFAULT_TRACE) if DEFAULT_TRACE.exists() else None)
    kind = "synthetic" if args.synthetic or trace is None else "trace"
    return ({"kind": kind, "duration_s": args.warmup + args.duration, "warmup_s": args.warmup},
            (trace if kind == "trace" else None))


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    wl = dict(job["workload"])
    warmup = wl.pop("warmup_s", 0.0)
    over = {"functions": job["functions"], "seed": job["seed"], "workload": wl}
    if job.get("models") is not None:
        over["models"] = job["models"]
    sc, extras = load_paper_scenario(job["scenario"], **over)
    t, fn, duration = scenario_arrivals(sc, job["trace"])
    t0 = time.perf_counter()
    policy = job["policy"]
    if policy == "torpor":
        sim = Simulation(sc, "torpor", link_physics=job["links"])
        r = sim.run(t, fn, duration)
        lat = getattr(sim, "latency", None)
    else:
        sim = PaperSim(sc, policy, extras, link_physics=job["links"])
        r = sim.run(t, fn, duration)
        lat = sim.latency
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
        fin = lat[np.isfinite(lat)]
        p99 = float(np.percentile(fin, 99) * 1e3) if fin.size else float("nan")
    return {
        "policy": policy, "functions": sc.functions, "requests": int(np.sum(t >= warmup)), **c,
        "compliant_frac": c["compliant"] / c["functions"] if c["functions"] else 1.0,
        "attainment": att, "p99_ms": p99, "swaps": r.swaps,
        "peer_copies": r.peer_copies, "gpu_busy": r.gpu_busy, "unserved": r.unserved,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def run_all(jobs: list[dict[str, Any]], n_jobs: int) -> list[dict[str, Any]]:
    # the slowest runs (ours, at the largest counts) first, so two workers finish together
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["policy"] != "torpor", -jobs[i]["functions"]))
    if n_jobs <= 1:
        out = {i: run_one(jobs[i]) for i in order}
    else:
        with ProcessPoolExecutor(n_jobs) as ex:
            futs = {i: ex.submit(run_one, jobs[i]) for i in order}
            out = {i: f.result() for i, f in futs.items()}
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


def exp_latency(args: Any) -> dict[str, Any]:
    sc, extras = load_paper_scenario(V100)
    rows, data = [], []
    for prof, e in zip(latency_profile(sc), extras):
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
          "(host swap over GPU 0's PCIe path, peer copy over a double NVLink pair, nothing else in flight)")
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
    report = {"experiment": "latency", "scenario": str(V100.relative_to(ROOT)), "models": data}
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
    jobs = [{"scenario": str(V100), "functions": 160, "seed": args.seed, "workload": wl, "trace": trace,
             "models": r152, "policy": p, "links": args.links} for p in policies]
    res = run_all(jobs, args.jobs)
    rows = []
    for r in res:
        pr = PAPER_R152.get(r["policy"], {})
        rows.append([r["policy"], str(r["executed"]), str(r["compliant"]),
                     "-" if not pr else f"{pr['executed']} / {pr['compliant'] if pr['compliant'] is not None else '-'}",
                     f"{r['attainment']:.2%}", f"{r['p99_ms']:.0f}", f"{r['wall_s']:.1f}"])
    print(f"(b) 160 ResNet-152 functions on the V100 node ({wl['kind']}, {wl['duration_s']:.0f} s, seed {args.seed}, "
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
    report = {"experiment": "resnet152", "workload": wl, "seed": args.seed, "results": res,
              "paper_reports": PAPER_R152}
    write(Path(args.out), "resnet152", report, fig)
    return report


# ------------------------------------------------------------------------------------------------
# (c), (d) sweeps
# ------------------------------------------------------------------------------------------------


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
    jobs = [{"scenario": str(scenario), "functions": n, "seed": args.seed, "workload": wl, "trace": trace,
             "policy": p, "links": args.links} for n in counts for p in policies]
    res = run_all(jobs, args.jobs)
    by = {(r["functions"], r["policy"]): r for r in res}
    rows = [[str(n), *(f"{by[(n, p)]['compliant_frac']:.1%}" for p in policies)] for n in counts]
    caps = {p: capacity(res, p) for p in policies}
    rows.append([">=99% up to", *("-" if caps[p] is None else str(caps[p]) for p in policies)])
    print(f"({name}) fraction of functions compliant (p98 within deadline), {title} "
          f"({wl['kind']}, {args.duration:.0f} s after {args.warmup:.0f} s warm-up, seed {args.seed}, "
          f"{'processor-sharing' if args.links == 'shared' else 'fixed-share'} links)")
    print(table(["functions", *policies], rows))
    ours, theirs = caps.get("torpor"), caps.get("paper")
    ratio = (ours / theirs) if ours and theirs else None
    never_below = (all(by[(n, "torpor")]["compliant"] >= by[(n, "paper")]["compliant"] for n in counts)
                   if {"torpor", "paper"} <= set(policies) else None)
    print(f"torpor vs paper: largest count with >=99% compliant {ours} vs {theirs}"
          f"{f' ({ratio:.2f}x)' if ratio else ''}; at least as many compliant at every point: {never_below}")
    p = plt()
    fig, ax = p.subplots(figsize=(6.4, 3.6))
    style = {"torpor": dict(color="C3", lw=2.5, marker="o"), "paper": dict(color="C0", lw=2, marker="s")}
    for pol in policies:
        ys = [by[(n, pol)]["compliant_frac"] * 100 for n in counts]
        ax.plot(counts, ys, label=pol if pol != "torpor" else "torpor (ours)",
                **style.get(pol, dict(lw=1, marker=".", ls="--")))
    if paper_marks:
        ax.plot(list(paper_marks), [v * 100 for v in paper_marks.values()], "kx", ms=9, mew=2,
                label="paper reports (Torpor)")
    ax.axhline(TARGET * 100, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("functions")
    ax.set_ylabel("compliant functions (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    report = {"experiment": name, "scenario": str(scenario.relative_to(ROOT)), "workload": wl, "seed": args.seed,
              "counts": counts, "policies": policies, "links": args.links, "results": res, "capacity_99": caps,
              "torpor_over_paper": ratio, "torpor_never_fewer": never_below}
    write(Path(args.out), name, report, fig)
    return report


def exp_mix(args: Any) -> dict[str, Any]:
    return sweep(args, "mix", V100, MIX_SWEEP, MIX_POLICIES, "Eight-model mix, 4 x V100 (paper's node)", PAPER_MIX)


def exp_h100(args: Any) -> dict[str, Any]:
    return sweep(args, "h100", H100, H100_SWEEP, H100_POLICIES, "Eight-model mix, 4 x H100 (PCIe 5, NVLink 4)",
                 None)


EXPERIMENTS = {"latency": exp_latency, "resnet152": exp_resnet152, "mix": exp_mix, "h100": exp_h100}
ALIASES = {"a": "latency", "b": "resnet152", "c": "mix", "d": "h100"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=[*EXPERIMENTS, *ALIASES, "all"])
    ap.add_argument("--trace", default=None, help="the paper's trace .npy (default: ../shared/data/ if present)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic generator even if the trace is there")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds measured (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of arrivals before measuring, not counted (default %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "paper"))
    ap.add_argument("--links", choices=["fixed", "shared"], default=None,
                    help="link physics: fixed shares (a copy keeps the share it started with) or processor "
                         "sharing; default: TORPOR_SIM_LINKS, else fixed")
    ap.add_argument("--policies", default=None,
                    help="comma-separated subset of the sweep's policies (default: all)")
    ap.add_argument("--counts", default=None, help="comma-separated function counts (default: the sweep's)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    args.links = args.links or link_physics_from_env()
    names = list(EXPERIMENTS) if args.experiment == "all" else [ALIASES.get(args.experiment, args.experiment)]
    t0 = time.perf_counter()
    for n in names:
        EXPERIMENTS[n](args)
        print()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
