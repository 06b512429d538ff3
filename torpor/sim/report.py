"""Running policies side by side on one scenario's arrivals: `simulate` (ours or the paper's),
`gpus_needed`, `compare`, `sweep`, their tables and plots, and the `torpor simulate` CLI (its
default scenario is `torpor/sim/scenarios/h100x4.json`, shipped with the package)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from torpor.scheduling.costmodel import GB, TopologyError
from torpor.scheduling.scheduler import POLICIES
from torpor.sim.cluster import ROUTINGS, compare_routings
from torpor.sim.errors import ErrorsError, errors_from_env, merge_errors
from torpor.sim.physics import DEFAULT_LINK_PHYSICS, LINK_PHYSICS, link_physics_from_env
from torpor.sim.scenario import SWEEP_PARAMS, Scenario, ScenarioError, parse_scenario
from torpor.sim.simulation import Simulation
from torpor.sim.state import LATENCY_PCTS, SimResult
from torpor.sim.workload import WorkloadError, scenario_arrivals, without_missing_trace

# The Torpor paper's own policies (torpor.sim.paper_sim), run beside ours on the same arrivals:
# its system (`paper`), its ablations and its baselines. `lru` is the paper's ablation (its
# system with LRU eviction), not our `lru-swap`.
PAPER_POLICIES = ("paper", "fifo", "random", "lru", "native", "keepalive")
CLI_POLICIES = (*POLICIES, *PAPER_POLICIES)


def paper_extras(spec: dict[str, Any], *, base: Path | None = None, source: str = "scenario") -> list[Any]:
    """The per-model numbers only the paper's policies read (native latency and footprint, cold
    start, Table 4 classes), from `<stem>.paper.csv` beside the scenario file where there is one
    (as `loadtest/paper_eval.py` reads them), else their defaults."""
    from torpor.sim.paper_sim import parse_with_extras, read_extras_csv

    side = Path(source).with_name(Path(source).stem + ".paper.csv")
    rows = read_extras_csv(side) if side.is_file() else {}
    return parse_with_extras(spec, rows, base=base, source=source)[1]


def simulate(sc: Scenario, policy: str, n_gpus: int | None = None, *, arrivals=None,
             trace_path: str | Path | None = None, stop_below: float | None = None,
             extras: list[Any] | None = None, link_physics: str = DEFAULT_LINK_PHYSICS) -> SimResult:
    """`policy` (ours or the paper's) on the scenario's arrivals (or `arrivals`), at the true
    times of the scenario's `errors` (`torpor.sim.errors`); `link_physics`: "shared" (the
    default) or "fixed" (`torpor.sim.physics`)."""
    t, fn, duration = arrivals if arrivals is not None else scenario_arrivals(sc, trace_path)
    if policy in PAPER_POLICIES:
        from torpor.sim.paper_sim import PaperSim

        # extras None: paper_sim's defaults
        sim = PaperSim(sc, policy, extras, n_gpus, link_physics=link_physics)
        r = sim.run(t, fn, duration)
        lat = sim.latency
        if len(lat):
            r.latency_pct_ms = [None if not math.isfinite(x) else round(x * 1e3, 3)
                                for x in np.percentile(lat, LATENCY_PCTS, method="lower")]
        return r
    return Simulation(sc, policy, n_gpus, link_physics=link_physics).run(t, fn, duration, stop_below=stop_below)


def gpus_needed(sc: Scenario, policy: str, arrivals, *, limit: int, target: float | None = None,
                start: int | None = None, extras: list[Any] | None = None, link_physics: str = DEFAULT_LINK_PHYSICS
                ) -> int | None:
    """The fewest GPUs (1..limit) at which `policy` reaches the target SLO attainment, taking
    attainment to grow with GPUs; None if `limit` is not enough. The search starts at `start`
    (default: the scenario's GPU count), steps outward doubling the step until the answer is
    bracketed, then bisects: a few runs near the answer, and runs that fall short stop early."""
    target = sc.target_attainment if target is None else target
    memo: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in memo:
            r = simulate(sc, policy, n, arrivals=arrivals, stop_below=target, extras=extras,
                         link_physics=link_physics)
            memo[n] = r.attainment >= target
        return memo[n]

    n = max(1, min(limit, start or sc.gpus))
    step = 1
    if ok(n):
        hi, lo = n, 0  # hi reaches the target, lo does not (0: nothing tried below)
        while hi > 1:
            m = max(1, hi - step)
            if not ok(m):
                lo = m
                break
            hi, step = m, step * 2
    else:
        lo = n
        while True:
            if lo >= limit:
                return None
            m = min(limit, lo + step)
            if ok(m):
                hi = m
                break
            lo, step = m, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def compare(sc: Scenario, *, policies: list[str] | None = None, trace_path: str | Path | None = None,
            search_gpus: int | None = None, extras: list[Any] | None = None, link_physics: str = DEFAULT_LINK_PHYSICS
            ) -> dict[str, Any]:
    """Every policy on the same arrivals; the fewest GPUs each needs when `search_gpus` > 0.
    Policies are ours (`POLICIES`) or the paper's (`PAPER_POLICIES`, which read `extras`: see
    `paper_extras`; None gives paper_sim's defaults)."""
    arrivals = scenario_arrivals(sc, trace_path)
    search = sc.search_gpus if search_gpus is None else search_gpus
    results = []
    for p in policies or sc.policies:
        if p not in CLI_POLICIES:
            raise ScenarioError(f"policy: unknown policy {p!r}; expected one of {list(CLI_POLICIES)}")
        r = simulate(sc, p, arrivals=arrivals, extras=extras, link_physics=link_physics)
        if search:
            t0 = time.perf_counter()
            r.gpus_needed = gpus_needed(sc, p, arrivals, limit=search, extras=extras, link_physics=link_physics)
            r.gpus_searched = search
            r.wall_s += time.perf_counter() - t0
        results.append(r)
    t, _, duration = arrivals
    return {
        "scenario": sc.name,
        "source": sc.source,
        "gpus": sc.gpus,
        "gpu_memory_GB": sc.gpu_memory / GB,
        "weight_budget_GB": sc.weight_budget / GB,
        "functions": sc.functions,
        "models": [m.__dict__ for m in sc.models],
        "total_model_GB": sum(sc.models[f % len(sc.models)].nbytes for f in range(sc.functions)) / GB,
        "requests": len(t),
        "duration_s": duration,
        "workload": sc.workload,
        "target_attainment": sc.target_attainment,
        "errors": sc.errors.as_dict(),
        "topology": sc.links(sc.gpus).as_dict(),
        "results": [r.as_dict() for r in results],
    }


def format_table(report: dict[str, Any]) -> str:
    head = (f"{report['scenario']}: {report['gpus']} GPUs x {_memory(report)}, "
            f"{report['functions']} functions ({report['total_model_GB']:.0f} GB of models), "
            f"{report['requests']} requests over {report['duration_s'] / 60:.0f} min")
    cols = ["policy", "SLO met", "fns ok", "p50 ms", "p99 ms", "swaps", "peer", "GB moved", "evict",
            "batch", "busy", "unserved", f"GPUs@{report['target_attainment']:.0%}", "wall s"]
    rows = []
    for r in report["results"]:
        rows.append([
            r["policy"], f"{r['attainment']:.2%}", f"{r['compliant_functions']:.1%}", f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}", str(r["swaps"]), str(r["peer_copies"]), f"{r['bytes_moved'] / GB:.0f}",
            str(r["evictions"]), f"{r.get('mean_batch', 1.0):.2f}", f"{r['gpu_busy']:.0%}", str(r["unserved"]),
            _gpus_cell(r), f"{r['wall_s']:.1f}",
        ])
    return "\n".join([head, *_grid(cols, rows)])


def format_routings(report: dict[str, Any]) -> str:
    """The table of `torpor.sim.cluster.compare_routings`'s report (`torpor simulate --nodes N`)."""
    head = (f"{report['scenario']}: {report['nodes']} nodes x {report['gpus_per_node']} GPUs, "
            f"{report['functions']} functions, {report['requests']} requests over {report['duration_s'] / 60:.0f} min")
    cols = ["routing", "SLO met", "fns ok", "p50 ms", "p99 ms", "device hits", "affinity", "busiest node",
            "swaps", "GB moved", "busy", "wall s"]
    rows = [[r["routing"], f"{r['attainment']:.2%}", f"{r['compliant_functions']:.1%}", f"{r['p50_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['hit_rate']:.1%}", f"{r['affinity']:.1%}", f"{max(r['node_share']):.1%}",
             str(r["swaps"]), f"{r['bytes_moved'] / GB:.0f}", f"{r['gpu_busy']:.0%}", f"{r['wall_s']:.1f}"]
            for r in report["results"]]
    return "\n".join([head, *_grid(cols, rows)])


def _memory(report: dict[str, Any]) -> str:
    mem, budget = report["gpu_memory_GB"], report.get("weight_budget_GB", report["gpu_memory_GB"])
    return f"{mem:g} GB" + (f" ({budget:g} GB for weights)" if budget < mem else "")


def _gpus_cell(r: dict[str, Any]) -> str:
    if not r.get("gpus_searched"):
        return "-"
    return f">{r['gpus_searched']}" if r.get("gpus_needed") is None else str(r["gpus_needed"])


def _grid(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return [line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def with_param(spec: dict[str, Any], param: str, value: float) -> dict[str, Any]:
    """A copy of a scenario dict with one sweep parameter set."""
    out = dict(spec)
    out.pop("sweep", None)
    if param == "rate_scale":
        out["workload"] = {**(spec.get("workload") or {}), "rate_scale": value}
    else:
        out[param] = value
    return out


def sweep(spec: dict[str, Any], param: str, values: list[float], *, base: Path | None = None,
          source: str = "scenario", policies: list[str] | None = None, trace_path: str | Path | None = None,
          search_gpus: int | None = None, progress: Any = None, link_physics: str = DEFAULT_LINK_PHYSICS
          ) -> dict[str, Any]:
    """`compare` at each value of one parameter (the same seed at every point, so at one point
    every policy sees the same arrivals). Returns {"sweep": {...}, "points": [compare reports]}."""
    points = []
    for v in values:
        point = with_param(spec, param, v)
        sc = parse_scenario(point, base=base, source=source)
        extras = (paper_extras(point, base=base, source=source)
                  if any(p in PAPER_POLICIES for p in policies or sc.policies) else None)
        rep = compare(sc, policies=policies, trace_path=trace_path, search_gpus=search_gpus, extras=extras,
                      link_physics=link_physics)
        rep["sweep_value"] = v
        points.append(rep)
        if progress is not None:
            progress(f"{param}={v}: " + ", ".join(f"{r['policy']} {r['attainment']:.2%}" for r in rep["results"]))
    first = points[0]
    return {"scenario": first["scenario"], "source": source, "sweep": {"param": param, "values": list(values)},
            "target_attainment": first["target_attainment"], "points": points}


def format_sweep(report: dict[str, Any]) -> str:
    param = report["sweep"]["param"]
    pts = report["points"]
    p0 = pts[0]
    policies = [r["policy"] for r in p0["results"]]
    searched = any(r.get("gpus_searched") for p in pts for r in p["results"])
    need = f" (GPUs needed for {report['target_attainment']:.0%} in brackets)" if searched else ""
    head = (f"{report['scenario']}: SLO attainment per policy over {param}{need}; "
            f"{p0['gpus']} GPUs x {_memory(p0)}, {p0['duration_s'] / 60:.0f} min per point")
    cols = [param, "requests", "GB of models", *policies]
    rows = []
    for p in pts:
        cells = []
        for r in p["results"]:
            cell = f"{r['attainment']:.2%}"
            if r.get("gpus_searched"):
                cell += f" ({_gpus_cell(r)})"
            cells.append(cell)
        v = p["sweep_value"]
        rows.append([f"{v:g}", str(p["requests"]), f"{p['total_model_GB']:.0f}", *cells])
    return "\n".join([head, *_grid(cols, rows)])


def _nines(attainment: float) -> float:
    # "nines" scale: 90% -> 1, 99% -> 2, 99.9% -> 3; shows 40% and 99.5% on one readable axis
    return -math.log10(max(1.0 - attainment, 1e-4))


def _nines_axis(ax: Any, target: float) -> None:
    ticks = [0.0, 50.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99]
    ax.set_yticks([_nines(t / 100) for t in ticks], [f"{t:g}%" for t in ticks])
    ax.set_ylim(0, _nines(0.9999) + 0.05)
    ax.axhline(_nines(target), ls="--", lw=0.8, color="k")
    ax.set_ylabel("requests within SLO")


def write_plot(report: dict[str, Any], path: str | Path) -> str:
    """A PNG of the report: attainment (and GPUs needed) against the swept parameter, or for one
    point the latency CDF and attainment per policy. Returns a line saying what was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'torpor[sim]'): no plot written"
    colors = {"torpor": "tab:blue", "lru-swap": "tab:orange", "static": "tab:gray", "paper": "tab:green",
              "fifo": "tab:olive", "random": "tab:pink", "lru": "tab:brown", "native": "tab:purple",
              "keepalive": "tab:cyan"}
    target = report["target_attainment"]
    if "sweep" in report:
        param = report["sweep"]["param"]
        pts = report["points"]
        xs = [p["sweep_value"] for p in pts]
        policies = [r["policy"] for r in pts[0]["results"]]
        searched = any(r.get("gpus_searched") for p in pts for r in p["results"])
        fig, axes = plt.subplots(1, 2 if searched else 1, figsize=(11 if searched else 6, 4), squeeze=False)
        ax = axes[0][0]
        for i, pol in enumerate(policies):
            ax.plot(xs, [_nines(p["results"][i]["attainment"]) for p in pts], "o-", label=pol, color=colors.get(pol))
        _nines_axis(ax, target)
        ax.set_xlabel(param)
        ax.set_title(f"{report['scenario']}: SLO attainment ({pts[0]['gpus']} GPUs)")
        ax.legend()
        ax.grid(alpha=0.3)
        if searched:
            ax = axes[0][1]
            for i, pol in enumerate(policies):
                ys = [p["results"][i].get("gpus_needed") for p in pts]
                ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], "o-",
                        label=pol, color=colors.get(pol))
            ax.set_xlabel(param)
            ax.set_ylabel(f"fewest GPUs for {target:.0%} within SLO")
            ax.set_ylim(bottom=0)
            ax.set_title("GPUs needed")
            ax.legend()
            ax.grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        for r in report["results"]:
            ys = [(q, v) for q, v in zip(LATENCY_PCTS, r.get("latency_pct_ms") or []) if v is not None]
            if ys:
                ax.plot([v for _, v in ys], [q for q, _ in ys], label=r["policy"], color=colors.get(r["policy"]))
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests (%)")
        ax.set_title(f"{report['scenario']}: latency CDF ({report['functions']} functions)")
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[1]
        pols = [r["policy"] for r in report["results"]]
        ax.bar(pols, [_nines(r["attainment"]) for r in report["results"]], color=[colors.get(p) for p in pols])
        _nines_axis(ax, target)
        ax.set_title(f"SLO attainment ({report['gpus']} GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


# ------------------------------------------------------------------------------------------------
# Command line (`torpor simulate`, loadtest/simulate.py)
# ------------------------------------------------------------------------------------------------

# shipped as package data (pyproject.toml); loadtest/scenarios links to the same folder
DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "h100x4.json"


def add_arguments(p: Any) -> None:
    p.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="scenario JSON (default: %(default)s)")
    p.add_argument("--policy", action="append", choices=list(CLI_POLICIES),
                   help="policy to run (repeatable; default: the scenario's list); also the paper's "
                        f"{', '.join(PAPER_POLICIES)} (torpor.sim.paper_sim) on the same arrivals")
    p.add_argument("--gpus", type=int, default=None, help="override the scenario's GPU count")
    p.add_argument("--functions", type=int, default=None, help="override the scenario's function count")
    p.add_argument("--duration", type=float, default=None, help="override the workload's duration (s)")
    p.add_argument("--workload", choices=["trace", "synthetic"], default=None, help="override the workload kind")
    p.add_argument("--trace", default=None,
                   help="trace .npy (default: ../shared/data/ beside the project; where it is absent, the "
                        "synthetic generator with the trace's statistics)")
    p.add_argument("--links", choices=list(LINK_PHYSICS), default=None,
                   help="link physics: processor sharing or fixed shares (a copy keeps the share it started "
                        "with); default: TORPOR_SIM_LINKS, else shared")
    p.add_argument("--errors", default=None, metavar="KEY=V,...",
                   help="true times vs the scheduler's (torpor.sim.errors), laid over the scenario's 'errors': "
                        "jitter (per-copy lognormal sigma), bandwidth_factor (true / believed), exec_sigma, "
                        "straggler_p, straggler_x (LOW:HIGH), copy_slowdown; e.g. jitter=0.1,bandwidth_factor=0.8; "
                        "default: TORPOR_SIM_ERRORS")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--search-gpus", type=int, default=None,
                   help="find the fewest GPUs (up to N) reaching the target attainment; 0: skip")
    p.add_argument("--sweep", default=None, metavar="PARAM=START:STOP:STEP",
                   help=f"run every policy at each value of one of {list(SWEEP_PARAMS)} "
                        "(e.g. functions=300:600:50; overrides the scenario's 'sweep'); 'none': no sweep")
    p.add_argument("--nodes", type=int, default=None,
                   help="multi-node mode: N nodes of the scenario's GPUs each behind a front router "
                        "(torpor.sim.cluster); every --routing on the same arrivals")
    p.add_argument("--routing", action="append", choices=list(ROUTINGS),
                   help="with --nodes: the front router (repeatable; default all): torpor (residency-aware, "
                        "torpor.scheduling.routing), round-robin, hash (consistent hashing of models to nodes)")
    p.add_argument("--json", default=None, help="write the report here (default: sim-<scenario>.json)")
    p.add_argument("--plot", default=None, help="write the PNG here (default: the JSON's name with .png)")


def run_cli(args: Any) -> int:
    try:
        links = getattr(args, "links", None) or link_physics_from_env()
    except ValueError as e:
        print(f"torpor simulate: {e}", file=sys.stderr)
        return 2
    try:
        p = Path(args.scenario)
        spec = json.loads(p.read_text())
        for attr, key in (("gpus", "gpus"), ("functions", "functions"), ("seed", "seed")):
            if getattr(args, attr) is not None:
                spec[key] = getattr(args, attr)
        extra = getattr(args, "errors", None) or errors_from_env()
        if extra:
            spec["errors"] = merge_errors(spec.get("errors"), extra)
        if args.duration is not None or args.workload is not None:
            spec["workload"] = dict(spec.get("workload") or {})
            if args.duration is not None:
                spec["workload"]["duration_s"] = args.duration
            if args.workload is not None:
                spec["workload"]["kind"] = args.workload
        workload, note = without_missing_trace(spec.get("workload") or {}, args.trace)
        if note is not None:
            spec["workload"] = workload
            print(f"torpor simulate: {note}", file=sys.stderr)
        sweep_arg = getattr(args, "sweep", None)
        if sweep_arg is not None:
            if sweep_arg.strip().lower() == "none":
                spec.pop("sweep", None)
            else:
                spec["sweep"] = sweep_arg
        sc = parse_scenario(spec, base=p.parent, source=str(p))
        nodes = getattr(args, "nodes", None)
        if nodes is not None:
            report = compare_routings(sc, nodes, getattr(args, "routing", None), trace_path=args.trace,
                                      link_physics=links)
            table = format_routings(report)
        elif sc.sweep is not None:
            param, values = sc.sweep
            report = sweep(spec, param, values, base=p.parent, source=str(p), policies=args.policy,
                           trace_path=args.trace, search_gpus=args.search_gpus,
                           progress=lambda line: print(line, file=sys.stderr, flush=True), link_physics=links)
            table = format_sweep(report)
        else:
            extras = (paper_extras(spec, base=p.parent, source=str(p))
                      if any(x in PAPER_POLICIES for x in args.policy or sc.policies) else None)
            report = compare(sc, policies=args.policy, trace_path=args.trace, search_gpus=args.search_gpus,
                             extras=extras, link_physics=links)
            table = format_table(report)
    except (OSError, json.JSONDecodeError) as e:
        print(f"torpor simulate: cannot read scenario {args.scenario}: {e}", file=sys.stderr)
        return 2
    except (ScenarioError, WorkloadError, TopologyError, ErrorsError) as e:
        print(f"torpor simulate: {e}", file=sys.stderr)
        return 2
    print(table)
    out = Path(args.json or f"sim-{sc.name}.json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if nodes is None:  # the cluster's report is its table and JSON
        print(write_plot(report, getattr(args, "plot", None) or out.with_suffix(".png")))
    return 0
