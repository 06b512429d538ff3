"""loadtest/e2e.py's report: the outcome of each arrival (RunLog), the statistics per class
(summarize), the per-run tables, the scheduler's predictions, Torpor's latency and goodput over
native's, and the one-row-per-load summary that `e2e.py --table` prints from a --json file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# outcomes of an arrival (RunLog.status)
OK, FAILED, DROPPED, LOST, SHED = 0, 1, 2, 3, 4


@dataclass
class RunLog:
    sched: np.ndarray  # scheduled arrival (s from start)
    func: np.ndarray
    proto: np.ndarray  # index into protocols
    latency: np.ndarray  # ms from scheduled arrival to the answer, refusal or error; nan if none came
    lag: np.ndarray  # ms the send started after its scheduled time
    status: np.ndarray  # OK, FAILED, DROPPED (too many outstanding), LOST (no response: cancelled), SHED
    errors: list = field(default_factory=list)
    shed_examples: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------


def pct(xs: np.ndarray, q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs.size else None


def summarize(log: RunLog, kinds_of: list[str], names: list[str], slo: dict[str, float], protos: list[str],
              swap_before: dict, swap_after: dict, stats_before: dict, stats_after: dict, duration: float) -> dict:
    kind_arr = np.array(kinds_of)[log.func] if log.func.size else np.zeros(0, dtype=str)
    out = {}
    groups = [(k, kind_arr == k) for k in dict.fromkeys(kinds_of)] + [("all", np.ones(log.func.size, bool))]
    if len(protos) > 1:
        groups += [(f"all/{p}", log.proto == j) for j, p in enumerate(protos)]
    for label, sel in groups:
        st = log.status[sel]
        lat = log.latency[sel][st == OK]
        shed_lat = log.latency[sel][st == SHED]
        # SLO per request by its own class
        ok_slo = 0
        for k in dict.fromkeys(kinds_of):
            m = sel & (kind_arr == k) & (log.status == OK)
            ok_slo += int((log.latency[m] <= slo[k]).sum())
        arrivals = int(sel.sum())
        answered, failed, dropped, shed = (int((st == x).sum()) for x in (OK, FAILED, DROPPED, SHED))
        row = {
            "arrivals": arrivals, "sent": arrivals - dropped, "answered": answered,
            "failed": failed, "shed": shed, "dropped": dropped,
            # neither an answer, a refusal nor an error (cancelled at the drain deadline)
            "lost": arrivals - answered - failed - dropped - shed,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": float(lat.mean()) if lat.size else None,
            "slo_ms": slo.get(label),
            "slo_attainment": ok_slo / arrivals if arrivals else None,  # dropped/failed/shed/lost count as misses
            "within_slo": ok_slo,
            "goodput_rps": ok_slo / duration if duration > 0 else None,  # answers within SLO per second
            "shed_p50_ms": pct(shed_lat, 50), "shed_p99_ms": pct(shed_lat, 99),  # how quickly they were refused
            # the longest any request waited for its answer, refusal or error: none may wait past its timeout
            "wait_max_ms": pct(log.latency[sel][np.isin(st, (OK, SHED, FAILED))], 100),
            "client_lag_p99_ms": pct(log.lag[sel][~np.isnan(log.lag[sel])], 99),
        }
        if not label.startswith("all/"):
            members = [nm for nm, k in zip(names, kinds_of, strict=True) if label == "all" or k == label]
            for key, metric in (("swap_ins", "torpor_swap_ins"), ("evictions", "torpor_swap_evictions"),
                                ("bytes_moved", "torpor_swap_bytes"), ("misses", "torpor_swap_misses"),
                                ("joins", "torpor_swap_joins"), ("hits", "torpor_swap_hits"),
                                ("memory_waits", "torpor_swap_memory_waits"), ("timeouts", "torpor_swap_timeouts"),
                                ("swap_us", "torpor_swap_duration_us")):
                row[key] = sum(swap_after.get(nm, {}).get(metric, 0.0) - swap_before.get(nm, {}).get(metric, 0.0)
                               for nm in members)
            cnt = ns = 0
            for nm in members:
                a = stats_after.get(nm, {}).get("compute_infer", {})
                b = stats_before.get(nm, {}).get("compute_infer", {})
                cnt += a.get("count", 0) - b.get("count", 0)
                ns += a.get("ns", 0) - b.get("ns", 0)
            row["server_compute_mean_ms"] = ns / cnt / 1e6 if cnt else None
        out[label] = row
    return out


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_predictions(pred: dict) -> None:
    """The scheduler's predicted latency from arrival against the measured one, per action."""
    if not pred:
        return
    print("scheduler: predicted vs measured latency per action (server side, ms; error = measured - predicted)")
    print(f"  {'action':8} {'requests':>8} {'pred p50':>9} {'meas p50':>9} {'pred p99':>9} {'meas p99':>9} "
          f"{'err p1':>8} {'err p50':>8} {'err p99':>8} {'late %':>7}")
    for action, p in pred.items():
        print(f"  {action:8} {p['requests']:>8} {p['predicted_ms_p50']:>9.1f} {p['measured_ms_p50']:>9.1f} "
              f"{p['predicted_ms_p99']:>9.1f} {p['measured_ms_p99']:>9.1f} {p['error_ms_p1']:>8.1f} "
              f"{p['error_ms_p50']:>8.1f} {p['error_ms_p99']:>8.1f} {p['late_vs_prediction_pct']:>7.1f}")


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'class':<12} {'sent':>6} {'ok':>6} {'fail':>5} {'shed':>5} {'lost':>4} {'drop':>5} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'SLO':>6} {'SLO %':>6} {'good/s':>7} {'swap-ins':>8} {'evict':>6} {'GB moved':>8} "
          f"{'srv ms':>7} {'lag99':>6}")
    for label, r in rows.items():
        print(f"{label:<12} {r['sent']:>6} {r['answered']:>6} {r['failed']:>5} {r['shed']:>5} {r['lost']:>4} "
              f"{r['dropped']:>5} {fmt(r['p50_ms']):>8} {fmt(r['p99_ms']):>8} {fmt(r['slo_ms'], '.0f'):>6} "
              f"{fmt(None if r['slo_attainment'] is None else 100 * r['slo_attainment']):>6} "
              f"{fmt(r['goodput_rps'], '.2f'):>7} "
              f"{fmt(r.get('swap_ins'), '.0f'):>8} {fmt(r.get('evictions'), '.0f'):>6} "
              f"{fmt(None if r.get('bytes_moved') is None else r['bytes_moved'] / 1e9, '.2f'):>8} "
              f"{fmt(r.get('server_compute_mean_ms'), '.2f'):>7} {fmt(r['client_lag_p99_ms']):>6}")
    a = rows["all"]
    if a["shed"]:
        print(f"shed: {a['shed']} of {a['arrivals']} arrivals ({100 * a['shed'] / a['arrivals']:.1f}%), refused in "
              f"p50 {fmt(a['shed_p50_ms'], '.2f')} ms / p99 {fmt(a['shed_p99_ms'], '.2f')} ms after their arrival")
    else:
        print(f"shed: 0 of {a['arrivals']} arrivals")
    print(f"longest wait for an answer, refusal or error: {fmt(a.get('wait_max_ms'), '.1f')} ms")


def _pair(nat: dict | None, tor: dict | None, key: str) -> str:
    """'native/torpor' counts for the summary table."""
    return "/".join("-" if r is None else str(r.get(key, "-")) for r in (nat, tor))


def _ratio(num, den) -> float | None:
    return num / den if num is not None and den else None


def torpor_over_native(runs: dict, keys: list[str]) -> dict:
    """Torpor's p50, p99 and goodput over native's, per run key (in `keys`' order) and class, for the
    runs both configurations answered."""
    ratios = {}
    nat, tor = runs.get("native", {}), runs.get("torpor", {})
    for key in keys:
        a = nat.get("workloads", {}).get(key, {}).get("classes")
        b = tor.get("workloads", {}).get(key, {}).get("classes")
        if not a or not b:
            continue
        ratios[key] = {}
        for label in b:
            if label in a and a[label]["p50_ms"] and b[label]["p50_ms"]:
                ratios[key][label] = {"p50": b[label]["p50_ms"] / a[label]["p50_ms"],
                                      "p99": b[label]["p99_ms"] / a[label]["p99_ms"],
                                      "goodput": _ratio(b[label]["goodput_rps"], a[label]["goodput_rps"])}
    return ratios


def print_ratios(ratios: dict, torpor_bound: int, total: int) -> None:
    """The table of torpor_over_native's ratios, under a line saying how much memory each side had."""
    print(f"\nTorpor / native (bound {torpor_bound / total:.2f} of the models' bytes; native needs "
          f"{total / torpor_bound:.1f}x Torpor's device memory; goodput = answers within SLO per second)")
    width = max(8, *(len(k) for k in ratios))
    print(f"{'workload':<{width}} {'class':<12} {'p50 ratio':>9} {'p99 ratio':>9} {'goodput ratio':>13}")
    for key, rows in ratios.items():
        for label, r in rows.items():
            print(f"{key:<{width}} {label:<12} {r['p50']:9.2f} {r['p99']:9.2f} {fmt(r['goodput'], '.2f'):>13}")


def print_summary(results: dict) -> None:
    """One row per load x workload (class "all"): native and Torpor side by side (--table)."""
    runs = results.get("runs", {})
    nat, tor = runs.get("native", {}).get("workloads", {}), runs.get("torpor", {}).get("workloads", {})
    keys = list(dict.fromkeys([*nat, *tor]))
    frac = results.get("fraction")
    print(f"\nnative = all resident; torpor = device memory bound to {fmt(frac, '.2f')} of the models' bytes; "
          f"{results.get('device')}, {'+'.join(results.get('protocols', []))}, {results.get('models', {}).get('count')} "
          f"models; SLO ms {results.get('slo_ms')}")
    print(f"{'':<15} {'':>6} | {'native':<29} | {'torpor':<29} | {'torpor / native':<15} | native/torpor counts")
    print(f"{'load':>5} {'workload':<9} {'req/s':>6} | {'p50':>6} {'p99':>7} {'SLO%':>6} {'good/s':>7} | "
          f"{'p50':>6} {'p99':>7} {'SLO%':>6} {'good/s':>7} | {'p99':>6} {'goodput':>8} | "
          f"{'failed':>8} {'shed':>8} {'lost':>6}")
    for key in keys:
        recs = [side.get(key, {}) for side in (nat, tor)]
        rows = [r.get("classes", {}).get("all") for r in recs]
        meta = next((r for r in recs if "classes" in r), recs[0])
        wl, load = meta.get("workload", key.partition("@")[0]), meta.get("load")
        offered = meta["arrivals"] / meta["duration_s"] if meta.get("duration_s") else None
        cells = []
        for r in rows:
            if r is None:
                cells.append(f"{'-':>6} {'-':>7} {'-':>6} {'-':>7}")
            else:
                att = None if r["slo_attainment"] is None else 100 * r["slo_attainment"]
                cells.append(f"{fmt(r['p50_ms']):>6} {fmt(r['p99_ms']):>7} {fmt(att):>6} "
                             f"{fmt(r.get('goodput_rps'), '.2f'):>7}")
        a, b = rows
        p99x = _ratio(b and b["p99_ms"], a and a["p99_ms"])
        goodx = _ratio(b and b.get("goodput_rps"), a and a.get("goodput_rps"))
        print(f"{fmt(load, 'g'):>5} {wl:<9} {fmt(offered):>6} | {cells[0]} | {cells[1]} | {fmt(p99x, '.2f'):>6} "
              f"{fmt(goodx, '.2f'):>8} | {_pair(a, b, 'failed'):>8} {_pair(a, b, 'shed'):>8} {_pair(a, b, 'lost'):>6}")
    print("load: as asked (req/s, the rate offered, shows where --max-rps capped it); SLO%: arrivals answered within "
          "their SLO; good/s: answers within SLO per second of the run; '-': not run")
    print(f"exit ok: {results.get('ok')}; failed {results.get('failed_requests')}, lost {results.get('lost_requests')}, "
          f"shed {results.get('shed_requests')} requests in all")



def _residency_summary(res: dict) -> dict:
    devs = res.get("devices", [])
    return {
        "devices": [{k: d.get(k) for k in ("name", "gpu", "capacity_bytes", "used_bytes", "free_bytes", "evictions",
                                           "fragmented_evictions", "fragmentation")} for d in devs],
        "resident_models": sum(len(d.get("models", [])) for d in devs),
        "host": res.get("host"),
        "policy": res.get("policy"),
    }
