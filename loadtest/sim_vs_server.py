"""The simulator against the server: loadtest/e2e.py's workloads replayed through the simulator
with the server's admission (`Staging`: `torpor.sim.staged`), predicted beside measured (issue 16).

    python loadtest/sim_vs_server.py E2E.json [E2E2.json ...] --json loadtest/measured/sim-vs-server.json

Each E2E.json is what `loadtest/e2e.py --json` wrote. From it the same experiment is rebuilt:

- arrivals: e2e's own generators (`zipf_arrivals`, `trace_arrivals`, imported from e2e.py), with
  the run's seed, offered rate or speedup and duration (and the zipf/burst options from its
  command line); the count is checked against the arrivals e2e recorded;
- models: N functions round-robin over the mix, each occupying its weights rounded up to the
  arena's 2 MiB blocks (`models.bytes_by_kind`), first group 1 MiB (torpor.runtime.partition), each
  class's SLO (`slo_ms`);
- devices: e2e's --device (cpu:N or one GPU), device memory = the configuration's bound
  (`bounds`), host link = the run's --device-bandwidths pcie=X (or --pcie-gbps);
  one execution at a time, `--stage-lookahead` (default 1) and shedding as the server's flags;
  the residents a warm-up leaves (one request per model in order);
- execution time per class (`--exec`): `fit` (the default), fitted per run and configuration
  so that the simulated compute_infer (from holding its stage to done) matches the server's
  mean on that run (`--fit-iters` fixed-point steps from the single-stream time less
  `--overhead-ms`), with `--overhead-ms` of HTTP round trip added to every answer; `single`,
  the warm-up's single-stream latency of that configuration (`runs.<config>.single_stream_ms`: a resident request end to end, HTTP
  included); or `load`, the server's own compute time under that very workload
  (`server_compute_mean_ms`, /v2/models/stats compute_infer, of the all-resident run, whose
  runs never wait for a copy) plus `--overhead-ms` of HTTP round trip that does not hold the
  device; `server`, the configuration's own learned run times on that run (the mean over a
  class's models of `exec_estimates_ms` at batch 1: runs that found their model landed); or
  `account`, the configuration's measured compute per run on that run (the placer's
  `run_account` per model: seconds computing over runs, copy waits left out); `--exec-noise`
  lognormal spread; `--errors` the simulator's error model (`torpor.sim.errors`: copy jitter,
  a bandwidth misestimate, run noise), e.g. what the server's copy calibration measured;
- the client: at most --max-outstanding requests in flight (e2e's; arrivals beyond it dropped).

Printed per run (workload@load) and configuration (native = all resident, torpor = the
fraction): answered, shed, dropped, SLO attainment (of all arrivals), goodput (answers within
SLO per second), p50/p99 per class, copies (swap-ins: copies started, by the class of the
request that started each; e2e's swap_ins), predicted (median over --seeds execution-noise seeds,
[min-max] where they differ, in the printed rows and the markdown table) beside measured;
then the sheds by when:why per class (the server's `torpor_requests_shed` labels; e2e records
them per class), copies and probes per model, the device's time per answered request (busy,
computing, waiting for copies inside runs; the server's from its run account) and how busy the
device was (simulated: occupied by runs, waits for their
copies included; measured: the share of the run the device's worker spent in runs).
--json writes it all.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest import e2e_workloads
from torpor.sim.scenario import Staging, parse_scenario
from torpor.sim.simulation import Simulation
from torpor.sim.state import ANSWERED, DROPPED, SHED_ARRIVAL, SHED_QUEUED

BLOCK = 2 * 1024 * 1024  # the arena's block size (e2e.py's BLOCK)
FIRST_GROUP = 1 << 20  # torpor.runtime.partition caps the first group at 1 MiB
E2E_MAX_BATCH = 8  # loadtest/e2e_workloads.py: max_batch_size of every generated model
MB = 1e6


def load_e2e():
    """loadtest/e2e_workloads.py, e2e's arrival generators and trace lookup."""
    return e2e_workloads


def e2e_options(command: str) -> argparse.Namespace:
    """The options of the e2e run that shape the experiment, from its recorded command line."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--burst-factor", type=float, default=4.0)
    ap.add_argument("--max-outstanding", type=int, default=256)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--server-arg", action="append", default=[])
    words = shlex.split(command.removeprefix("e2e.main(").removesuffix(")"))
    opts, _ = ap.parse_known_args(words)
    server = " ".join(opts.server_arg)
    m = re.search(r"--device-bandwidths[= ]\S*?pcie=([0-9.]+)", server)
    opts.pcie_gbps = float(m.group(1)) if m else None
    m = re.search(r"--stage-lookahead[= ](\d+)", server)
    opts.lookahead = int(m.group(1)) if m else 1
    opts.shed = not re.search(r"--shed-late[= ](false|0|no)", server)
    return opts


def devices_of(device: str) -> int:
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if device.startswith("cuda:") or m is None or m.group(1) == "cuda":
        return 1  # e2e serves on one GPU (cuda or cuda:N)
    return int(m.group(2) or 1)


def scenario(e2e: dict, cfg: str, exec_ms: dict[str, float], pcie_gbps: float, n_dev: int, noise: float,
             seed: int, errors: str | None = None) -> dict:
    mix = e2e["models"]["mix"]
    n = e2e["models"]["count"]
    models = []
    for k in mix:
        count = sum(1 for i in range(n) if mix[i % len(mix)] == k)
        nbytes = e2e["models"]["bytes_by_kind"][k] / count
        # lognormal noise around the median: the calibrated time is the mean, kept
        median_ms = exec_ms[k] * math.exp(-noise * noise / 2)
        models.append({"name": k, "size_MB": math.ceil(nbytes / BLOCK) * BLOCK / MB, "exec_ms": median_ms,
                       "slo_ms": e2e["slo_ms"][k], "first_group_MB": FIRST_GROUP / MB,
                       # e2e --batching: `dynamic_batching { }` beside max_batch_size 8 in every config
                       # (a batch's cost: the scenario's default batch_scale, not measured for these models)
                       **({"max_batch": E2E_MAX_BATCH} if e2e["models"].get("batching") else {})})
    return {"name": f"e2e-{cfg}", "gpus": n_dev, "gpu_memory_GB": e2e["bounds"][cfg] / 1e9,
            "node": {"pcie_GBps": pcie_gbps}, "models": models, "functions": n,
            "workload": {"kind": "synthetic", "duration_s": 1}, "exec_noise": noise, "seed": seed,
            **({"errors": errors} if errors else {})}


def arrivals(e2e_mod, e2e: dict, opts: argparse.Namespace, key: str, run: dict) -> tuple[np.ndarray, np.ndarray]:
    n = e2e["models"]["count"]
    load = run.get("load")
    workload = run.get("workload", key.partition("@")[0])
    cal = next((x for x in e2e.get("loads", []) if x.get("requested") == load), None) or e2e.get("load")
    if cal is None:
        raise SystemExit(f"no calibration (offered rate, speedup) for load {load} in the e2e JSON")
    if workload == "zipf":
        t, f = e2e_mod.zipf_arrivals(n, cal["offered_rps"], run["duration_s"], e2e["seed"], opts.zipf_s,
                                     opts.burst_factor)
    else:
        path = e2e_mod.find_trace(opts.trace if opts.trace and Path(opts.trace).is_file() else None)
        if path is None:
            raise SystemExit("the trace workload needs the trace (../shared/data/torpor-trace-samples.npy)")
        t, f, _ = e2e_mod.trace_arrivals(np.load(path), n, cal["speedup"], run["duration_s"], e2e["seed"])
    if t.size != run["arrivals"]:
        raise SystemExit(f"{key}: {t.size} arrivals regenerated, e2e recorded {run['arrivals']}")
    return t, f


def exec_times(e2e: dict, cfg: str, key: str, how: str, overhead_ms: float) -> dict[str, float]:
    """Execution ms per class as `--exec` says (`fit` starts from the single-stream times)."""
    mix = e2e["models"]["mix"]
    single = {k: e2e["runs"][cfg]["single_stream_ms"][k] for k in mix}
    if how == "single":
        return single
    if how == "fit":
        return {k: max(0.05, v - overhead_ms) for k, v in single.items()}
    if how in ("account", "server"):
        run = e2e["runs"][cfg]["workloads"][key]
        out = {}
        for k in mix:  # e2e names a class's models <class>_<index>
            if how == "account":  # measured compute per run on that run (the placer's account)
                acc = [a for n, a in (run.get("run_account_by_model") or {}).items() if n.startswith(k + "_")]
                runs = sum(a.get("runs", 0) for a in acc)
                ms = sum(a.get("compute_s", 0.0) for a in acc) / runs * 1e3 if runs else None
            else:  # its learned run times at batch 1 (runs that found the model landed)
                vals = [per["1"] for n, per in (run.get("exec_estimates_ms") or {}).items()
                        if n.startswith(k + "_") and "1" in per]
                ms = float(np.mean(vals)) if vals else None
            out[k] = ms if ms is not None else max(0.05, single[k] - overhead_ms)
        return out
    # under load: the all-resident run's compute time on the same workload (no copy waits in it)
    classes = e2e["runs"]["native"]["workloads"][key]["classes"]
    return {k: classes[k].get("server_compute_mean_ms") or max(0.05, single[k] - overhead_ms) for k in mix}


def compute_infer_ms(sim: Simulation, t: np.ndarray, f: np.ndarray, mix: list[str]) -> dict[str, float | None]:
    """The engine's compute_infer per class, simulated: from holding its stage and model (the
    engine's t_exec_start) to done, so the wait behind the running request and for its own copy
    count, as in /v2/models/stats; mean over answered requests."""
    kinds = np.array([mix[i % len(mix)] for i in f]) if f.size else np.zeros(0, dtype=str)
    done = t + sim.latency
    out = {}
    for k in mix:
        sel = (kinds == k) & (sim.status == ANSWERED) & np.isfinite(sim.latency) & np.isfinite(sim.acquired)
        out[k] = float(np.mean(done[sel] - sim.acquired[sel]) * 1e3) if sel.any() else None
    return out


def fit_exec(e2e: dict, cfg: str, run: dict, t: np.ndarray, f: np.ndarray, exec_ms: dict[str, float],
             build, iters: int) -> tuple[dict[str, float], list[dict]]:
    """Execution ms per class under load such that the simulated compute_infer (`compute_infer_ms`)
    matches what the server measured on this very run (`server_compute_mean_ms`): the measured
    mean counts the wait behind the running request (and, with copies, for them), so it is not
    the execution time itself. A few fixed-point steps, exec x measured / simulated."""
    mix = e2e["models"]["mix"]
    target = {k: run["classes"][k].get("server_compute_mean_ms") for k in mix}
    steps = []
    for _ in range(iters):
        sim = build(exec_ms, 1)
        got = compute_infer_ms(sim, t, f, mix)
        steps.append({"exec_ms": dict(exec_ms), "compute_infer_ms": got})
        exec_ms = {k: v * (target[k] / got[k] if target[k] and got[k] else 1.0) for k, v in exec_ms.items()}
    return exec_ms, steps


def summarize(sim: Simulation, t: np.ndarray, f: np.ndarray, mix: list[str], slo_ms: dict[str, float],
              duration: float, overhead_s: float) -> dict:
    kinds = np.array([mix[i % len(mix)] for i in f]) if f.size else np.zeros(0, dtype=str)
    lat = sim.latency + overhead_s  # inf stays inf: not answered
    st = sim.status
    copied = np.zeros(f.size, dtype=int)  # copies each request started (the server's swap_ins)
    for _, rid, _, _ in getattr(sim, "copies", []):
        copied[rid] += 1
    why = getattr(sim, "shed_why", {})
    out = {}
    for label, sel in [*((k, kinds == k) for k in mix), ("all", np.ones(f.size, bool))]:
        reasons: dict[str, int] = {}
        for rid, w in why.items():
            if sel[rid]:
                reasons[w] = reasons.get(w, 0) + 1
        ok = st[sel] == ANSWERED
        ans = lat[sel][ok & np.isfinite(lat[sel])]
        slo = np.array([slo_ms[k] for k in kinds[sel]]) / 1e3
        within = int(np.sum(lat[sel] <= slo))
        out[label] = {
            "arrivals": int(sel.sum()), "answered": int(ans.size),
            "shed": int(np.sum((st[sel] == SHED_ARRIVAL) | (st[sel] == SHED_QUEUED))),
            "shed_arrival": int(np.sum(st[sel] == SHED_ARRIVAL)), "shed_queued": int(np.sum(st[sel] == SHED_QUEUED)),
            "shed_reasons": dict(sorted(reasons.items())),
            "dropped": int(np.sum(st[sel] == DROPPED)),
            "swap_ins": int(copied[sel].sum()),
            "p50_ms": float(np.percentile(ans, 50) * 1e3) if ans.size else None,
            "p99_ms": float(np.percentile(ans, 99) * 1e3) if ans.size else None,
            "slo_attainment": within / sel.sum() if sel.sum() else None,
            "goodput_rps": within / duration,
        }
    # the share of the run the devices were occupied (a run's wait for its copy included), as
    # the server's device_busy (its workers' time in runs)
    out["all"]["device_busy"] = sum(d.busy_s for d in sim.devs) / (len(sim.devs) * duration)
    # where that time went, as the placer's run account: computing, waiting for copies in runs
    out["all"]["busy_s"] = sum(d.busy_s for d in sim.devs)
    out["all"]["compute_s"] = sum(d.compute_s for d in sim.devs)
    out["all"]["copy_wait_s"] = sum(d.copy_wait_s for d in sim.devs)
    # copies per function (its index: e2e's model names in order), as e2e's swap_ins_by_model
    by_fn = np.bincount(f, weights=copied, minlength=int(f.max()) + 1 if f.size else 0)
    out["all"]["swap_ins_by_fn"] = {str(i): int(n) for i, n in enumerate(by_fn)}
    out["all"]["probes_by_fn"] = {str(i): int(n) for i, n in getattr(sim, "probes", {}).items()}
    return out


ACTIONS = {1: "run", 2: "queue", 3: "swap", 4: "peer"}  # the simulator's action codes (torpor.sim.state)


def by_action(sim: Simulation, t: np.ndarray, keep: int = 4096) -> dict:
    """The scheduler's predicted latency (from arrival) against the simulated one per action, for
    answered requests, as the server's /v2/torpor/topology 'predictions' (its last `keep`
    answers per action)."""
    out = {}
    done = t + sim.latency
    for code, action in ACTIONS.items():
        sel = np.flatnonzero((sim.action_of == code) & (sim.status == ANSWERED) & np.isfinite(sim.latency))
        if not sel.size:
            continue
        sel = sel[np.argsort(done[sel], kind="stable")][-keep:]
        p, m = sim.predicted[sel] * 1e3, sim.latency[sel] * 1e3
        out[action] = {"requests": int(np.sum((sim.action_of == code) & (sim.status == ANSWERED))),
                       "predicted_ms_p50": float(np.percentile(p, 50)), "measured_ms_p50": float(np.percentile(m, 50)),
                       "predicted_ms_p99": float(np.percentile(p, 99)), "measured_ms_p99": float(np.percentile(m, 99))}
    return out


def print_actions(sim_actions: dict, server: dict | None) -> None:
    print("scheduler per action, server side (no HTTP): predicted p50 / p99 and latency p50 / p99 ms, "
          "simulated | server")
    for action in dict.fromkeys([*sim_actions, *(server or {})]):
        row = []
        for src in (sim_actions, server or {}):
            a = src.get(action)
            row.append("-" if a is None else f"{a['requests']:>5} req  pred {a['predicted_ms_p50']:6.1f} / "
                       f"{a['predicted_ms_p99']:6.1f}  lat {a['measured_ms_p50']:6.1f} / {a['measured_ms_p99']:6.1f}")
        print(f"  {action:<6} {row[0]:<60} | {row[1]}")


FIELDS = ("answered", "shed", "dropped", "slo_attainment", "goodput_rps", "p50_ms", "p99_ms", "swap_ins")


def median_of(runs: list[dict]) -> dict:
    """Per class and field: the median over seeds, and [min, max]."""
    out = {}
    for label in runs[0]:
        row = {}
        for k in runs[0][label]:
            if isinstance(runs[0][label][k], dict):  # counts by name: the median of each
                names = dict.fromkeys(n for r in runs for n in r[label][k])
                row[k] = {n: float(np.median([r[label][k].get(n, 0) for r in runs])) for n in names}
                continue
            xs = [r[label][k] for r in runs if r[label][k] is not None]
            row[k] = float(np.median(xs)) if xs else None
            row[k + "_range"] = [float(min(xs)), float(max(xs))] if xs else None
        out[label] = row
    return out


def print_account(pred: dict, account: dict, run: dict) -> None:
    """Device time per answered request, simulated | server (the placer's run account): its
    worker busy, in the model's compute, waiting for copies inside runs, and the rest of the
    worker's time (collecting a batch, binding, the interpreter; 0 in the simulator)."""
    def per(total: float, answered: float) -> str:
        return f"{total / answered * 1e3:.2f}" if answered else "-"

    n_sim = pred["answered"]
    n = run["classes"]["all"]["answered"]
    if all("busy_s" in a for a in account.values()):
        busy = sum(a["busy_s"] for a in account.values())
    else:  # runs recorded before e2e kept it: the busy share times the run's length (its drain left out)
        busy = sum(run.get("device_busy", {}).values()) * run["duration_s"]
    compute = sum(a.get("compute_s", 0.0) for a in account.values())
    wait = sum(a.get("copy_wait_s", 0.0) for a in account.values())
    print(f"device ms per answer, simulated | server: busy {per(pred['busy_s'], n_sim)} | {per(busy, n)}, "
          f"compute {per(pred['compute_s'], n_sim)} | {per(compute, n)}, "
          f"copy waits {per(pred['copy_wait_s'], n_sim)} | {per(wait, n)}, "
          f"rest 0 | {per(busy - compute - wait, n)}")


def fmt_ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def cell(x, spec: str, rng=None) -> str:
    if x is None:
        return "-"
    s = format(x, spec)
    if rng is not None and format(rng[0], spec) != format(rng[1], spec):
        s += f" [{format(rng[0], spec)}-{format(rng[1], spec)}]"
    return s


def print_rows(title: str, pred: dict, meas: dict, mix: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'class':<10} {'':<5} {'answered':>16} {'shed':>16} {'drop':>9} {'SLO %':>18} {'good/s':>18} "
          f"{'p50 ms':>18} {'p99 ms':>22} {'copies':>16}")
    for label in [*mix, "all"]:
        p, m = pred[label], meas[label]
        print(f"{label:<10} {'pred':<5} {cell(p['answered'], '.0f', p['answered_range']):>16} "
              f"{cell(p['shed'], '.0f', p['shed_range']):>16} {cell(p['dropped'], '.0f'):>9} "
              f"{cell(100 * p['slo_attainment'], '.1f', [100 * x for x in p['slo_attainment_range']]):>18} "
              f"{cell(p['goodput_rps'], '.1f', p['goodput_rps_range']):>18} "
              f"{cell(p['p50_ms'], '.1f', p['p50_ms_range']):>18} {cell(p['p99_ms'], '.0f', p['p99_ms_range']):>22} "
              f"{cell(p['swap_ins'], '.0f', p['swap_ins_range']):>16}")
        print(f"{'':<10} {'meas':<5} {m['answered']:>16} {m['shed']:>16} {m['dropped']:>9} "
              f"{cell(100 * m['slo_attainment'], '.1f'):>18} {cell(m['goodput_rps'], '.1f'):>18} "
              f"{cell(m['p50_ms'], '.1f'):>18} {cell(m['p99_ms'], '.0f'):>22} {cell(m['swap_ins'], '.0f'):>16}")


def measured(row: dict, duration: float) -> dict:
    """e2e's numbers for one class (older e2e JSONs: no shed or goodput fields)."""
    out = {k: row.get(k) for k in (*FIELDS, "failed", "lost", "arrivals", "server_compute_mean_ms")}
    out["shed"] = out["shed"] or 0
    if out["goodput_rps"] is None and row.get("slo_attainment") is not None:
        out["goodput_rps"] = row["slo_attainment"] * row["arrivals"] / duration
    return out


def compare_one(path: Path, args: argparse.Namespace, e2e_mod) -> dict:
    e2e = json.loads(path.read_text())
    opts = e2e_options(e2e.get("command", ""))
    pcie = args.pcie_gbps or opts.pcie_gbps
    if pcie is None:
        raise SystemExit(f"{path}: no --device-bandwidths pcie=X in its command; give --pcie-gbps")
    n_dev = devices_of(e2e.get("device", opts.device))
    mix = e2e["models"]["mix"]
    lookahead = args.lookahead if args.lookahead is not None else opts.lookahead
    staging = Staging(lookahead, opts.shed, 0.0 if args.release_ms == "measured" else float(args.release_ms) / 1e3,
                      args.copy_delay_ms / 1e3)
    overhead_s = args.overhead_ms / 1e3 if args.exec != "single" else 0.0
    out = {"e2e_json": str(path), "e2e_command": e2e.get("command"), "device": e2e.get("device"),
           "pcie_GBps": pcie, "staging": {"lookahead": staging.lookahead, "shed": staging.shed,
                                          "release_ms": args.release_ms, "copy_delay_ms": args.copy_delay_ms},
           "max_outstanding": opts.max_outstanding, "runs": {}}
    keys = list(dict.fromkeys(k for c in ("native", "torpor") for k in e2e["runs"].get(c, {}).get("workloads", {})))
    for key in keys:
        for cfg in ("native", "torpor"):
            run = e2e["runs"].get(cfg, {}).get("workloads", {}).get(key)
            if not run or "classes" not in run:
                continue
            t, f = arrivals(e2e_mod, e2e, opts, key, run)
            wall = time.perf_counter()
            if args.release_ms == "measured":  # the mean delay this server run measured (e2e's lags_ms)
                release = (run.get("lags_ms") or {}).get("release", {}).get("mean_ms", 0.0)
                staging = Staging(lookahead, opts.shed, release / 1e3, args.copy_delay_ms / 1e3)

            def build(exec_ms: dict[str, float], seed: int, cfg: str = cfg, run: dict = run, t=t, f=f,
                      staging: Staging = staging) -> Simulation:
                sc = parse_scenario(scenario(e2e, cfg, exec_ms, pcie, n_dev, args.exec_noise, seed, args.errors))
                sim = Simulation(sc, "torpor", staging=staging)
                sim.preload(list(range(e2e["models"]["count"])))
                sim.run(t, f, run["duration_s"], max_outstanding=opts.max_outstanding)
                return sim

            exec_ms = exec_times(e2e, cfg, key, args.exec, args.overhead_ms)
            fit_steps = []
            if args.exec == "fit":
                exec_ms, fit_steps = fit_exec(e2e, cfg, run, t, f, exec_ms, build, args.fit_iters)
            per_seed, ci = [], []
            for seed in range(1, args.seeds + 1):
                sim = build(exec_ms, seed)
                per_seed.append(summarize(sim, t, f, mix, e2e["slo_ms"], run["duration_s"], overhead_s))
                ci.append(compute_infer_ms(sim, t, f, mix))
                if seed == 1:
                    actions = by_action(sim, t)
            pred = median_of(per_seed)
            meas = {label: measured(run["classes"][label], run["duration_s"]) for label in [*mix, "all"]}
            print_rows(f"{cfg} / {key}: {t.size} arrivals over {run['duration_s']:.0f}s; exec ms "
                       + ", ".join(f"{k} {v:.2f}" for k, v in exec_ms.items())
                       + f" ({args.exec}); {args.seeds} seeds in {time.perf_counter() - wall:.1f}s", pred, meas, mix)
            sim_ci = {k: float(np.median([c[k] for c in ci if c[k] is not None])) for k in mix
                      if any(c[k] is not None for c in ci)}
            print("compute_infer ms (stage to done), predicted / measured: " + ", ".join(
                f"{k} {sim_ci.get(k, float('nan')):.2f} / {fmt_ms(meas[k]['server_compute_mean_ms'])}" for k in mix))
            print_actions(actions, run.get("predictions"))
            print_reasons(pred, run, mix)
            served = run.get("swap_ins_by_model")
            if served and cfg != "native":
                names = list(served)
                print("copies per model, simulated | server: " + ", ".join(
                    f"{n} {pred['all']['swap_ins_by_fn'].get(str(i), 0):.0f} | {served[n]:.0f}"
                    for i, n in enumerate(names)))
                probed = run.get("probes_by_model") or {}
                print("probes per model, simulated | server: " + ", ".join(
                    f"{n} {pred['all']['probes_by_fn'].get(str(i), 0):.0f} | {probed.get(n, 0):.0f}"
                    for i, n in enumerate(names)))
            account = run.get("run_account") or {}
            if account and cfg != "native":
                print_account(pred["all"], account, run)
            busy = run.get("device_busy") or {}
            print(f"device busy, simulated | server: {pred['all']['device_busy']:.1%} | "
                  + (", ".join(f"{d} {b:.1%}" for d, b in busy.items()) or "-"))
            label = key if "@" in key else f"{key}@{run.get('load', e2e.get('load', {}).get('load', '?')):g}"
            out["runs"][f"{cfg}/{label}"] = {
                "exec_ms": exec_ms, "fit_steps": fit_steps, "predicted": pred,
                "predicted_compute_infer_ms": sim_ci, "measured": meas,
                "scheduler_by_action": {"simulated_seed1": actions, "server": run.get("predictions")}}
    return out


def print_reasons(pred: dict, run: dict, mix: list[str]) -> None:
    """Sheds by when:why (the server's `torpor_requests_shed` labels), simulated (median over
    seeds) | server, per class where e2e recorded it per class, else in all."""
    server = run.get("shed_reasons_by_class") or {"all": run.get("shed_reasons") or {}}
    labels = list(mix) if run.get("shed_reasons_by_class") else ["all"]
    names = sorted({n for k in labels for n in pred[k].get("shed_reasons", {})} | {n for v in server.values() for n in v})
    if not names:
        return
    print("shed when:why, simulated | server")
    for k in labels:
        sim_r, srv = pred[k].get("shed_reasons", {}), server.get(k, {})
        print(f"  {k:<10} " + "  ".join(f"{n} {sim_r.get(n, 0):.0f} | {srv.get(n, 0)}" for n in names))


def markdown(results: dict) -> str:
    """One row per run, configuration and class: predicted / measured; the prediction is the
    median over seeds, [min-max] over them where they differ."""
    def pm(p: dict, m: dict, field: str, spec: str, scale: float = 1.0) -> str:
        x, rng, y = p[field], p.get(field + "_range"), m[field]
        pred = cell(None if x is None else x * scale, spec, None if rng is None else [v * scale for v in rng])
        return f"{pred} / {cell(None if y is None else y * scale, spec)}"

    lines = ["| e2e | run | config | class | answered | shed | SLO % | goodput/s | p50 ms | p99 ms | copies |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["compared"]:
        e2e = Path(c["e2e_json"]).stem
        for name, r in c["runs"].items():
            cfg, _, key = name.partition("/")
            for label, p in r["predicted"].items():
                m = r["measured"][label]
                copies = pm(p, m, "swap_ins", ".0f") if cfg != "native" else "-"
                lines.append(f"| {e2e} | {key} | {cfg} | {label} | {pm(p, m, 'answered', '.0f')} | "
                             f"{pm(p, m, 'shed', '.0f')} | {pm(p, m, 'slo_attainment', '.1f', 100)} | "
                             f"{pm(p, m, 'goodput_rps', '.1f')} | {pm(p, m, 'p50_ms', '.1f')} | "
                             f"{pm(p, m, 'p99_ms', '.0f')} | {copies} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("e2e_json", type=Path, nargs="+", help="what loadtest/e2e.py --json wrote")
    ap.add_argument("--exec", choices=["fit", "single", "load", "server", "account"], default="fit",
                    help="execution time per class: fitted so that the simulated compute_infer matches the "
                         "server's on that run (default), the single-stream latency, or the all-resident "
                         "run's compute_infer as it is, or the configuration's own learned run times")
    ap.add_argument("--fit-iters", type=int, default=4, help="--exec fit: fixed-point steps")
    ap.add_argument("--overhead-ms", type=float, default=0.5,
                    help="--exec fit/load: HTTP round trip added to every answer, not holding the device")
    ap.add_argument("--exec-noise", type=float, default=0.1,
                    help="lognormal sigma of execution times around their median (the mean is the calibrated time)")
    ap.add_argument("--seeds", type=int, default=5, help="execution-noise seeds (median and range reported)")
    ap.add_argument("--pcie-gbps", type=float, default=None, help="host link GB/s (default: the run's pcie=X)")
    ap.add_argument("--lookahead", type=int, default=None, help="stages beyond the running one (default: the run's)")
    ap.add_argument("--release-ms", default="0",
                    help="the event loop's delay in acting on a finished run (Staging.release_s), ms, or "
                         "'measured': each run's own mean (e2e's lags_ms.release, recorded since it measures it)")
    ap.add_argument("--copy-delay-ms", type=float, default=0.0,
                    help="from a request taking memory to its copy moving (Staging.copy_delay_s)")
    ap.add_argument("--errors", default=None,
                    help="the simulator's error model (torpor.sim.errors), e.g. jitter=0.14,bandwidth_factor=0.95: "
                         "what the server's copy calibration measured (calibration.copies: mean, spread)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    e2e_mod = load_e2e()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else str(argv),
               "exec": args.exec, "overhead_ms": args.overhead_ms if args.exec != "single" else 0.0,
               "exec_noise": args.exec_noise, "seeds": args.seeds,
               "compared": [compare_one(p, args, e2e_mod) for p in args.e2e_json]}
    print("\npredicted / measured (predicted: median over seeds)")
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
