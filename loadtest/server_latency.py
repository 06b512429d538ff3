"""End-to-end latency through a running Torpor server: warm (resident) vs. alternating models
that cannot all stay resident (each request swaps its model in).

    python loadtest/server_latency.py --url localhost:8000 --models resnet50,bert --n 30 --json out.json

Run the server with an arena too small for all the listed models (e.g. `--devices cuda
--device-memory-bytes 500MiB` for resnet50 + bert) to see the swap path; with room for all of
them both columns show resident latency. Prints a table; latencies include HTTP and encoding.

For the warm requests it also splits the time by the server's own statistics (Triton's
`/v2/models/{m}/stats`, differenced around them): queue, compute input, compute infer (the
model's run) and compute output per request, and what is left of the client's mean outside them
(HTTP, encoding and the server's front end): the server's overhead on the resident path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient


def make_inputs(client, model: str, seq: int):
    md = client.get_model_metadata(model)
    inputs = []
    rng = np.random.default_rng(0)
    for spec in md["inputs"]:
        shape = [1 if d == -1 and i == 0 else (seq if d == -1 else d) for i, d in enumerate(spec["shape"])]
        if spec["datatype"] == "FP32":
            x = rng.standard_normal(shape).astype(np.float32)
        elif spec["datatype"] == "INT64":
            if "mask" in spec["name"]:
                x = np.ones(shape, dtype=np.int64)
            elif "type" in spec["name"]:
                x = np.zeros(shape, dtype=np.int64)
            else:
                x = rng.integers(0, 1000, shape, dtype=np.int64)
        elif spec["datatype"] == "INT32":
            x = rng.integers(0, 100, shape, dtype=np.int32)
        else:
            raise SystemExit(f"{model}: unsupported input datatype {spec['datatype']}")
        inp = httpclient.InferInput(spec["name"], shape, spec["datatype"])
        inp.set_data_from_numpy(x)
        inputs.append(inp)
    return inputs


def timed(client, model, inputs) -> float:
    t = time.perf_counter()
    client.infer(model, inputs)
    return (time.perf_counter() - t) * 1e3


STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def stat_totals(client, model: str) -> dict[str, int]:
    """Triton's cumulative statistics of `model` (its ready version): ns per stage and the count."""
    st = client.get_inference_statistics(model_name=model)["model_stats"][0]["inference_stats"]
    out = {k: int(st[k]["ns"]) for k in STAGES}
    out["count"] = int(st["success"]["count"])
    return out


def breakdown(before: dict[str, int], after: dict[str, int], client_mean_ms: float) -> dict[str, float]:
    """Per-request ms in each stage between two `stat_totals`, and the client's mean outside them."""
    n = after["count"] - before["count"]
    out = {f"{k}_ms": (after[k] - before[k]) / n / 1e6 if n else float("nan") for k in STAGES}
    out["outside_ms"] = client_mean_ms - sum(out[f"{k}_ms"] for k in STAGES)
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="localhost:8000")
    ap.add_argument("--models", default="resnet50,bert")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    client = httpclient.InferenceServerClient(args.url, network_timeout=300)
    models = args.models.split(",")
    inputs = {m: make_inputs(client, m, args.seq) for m in models}
    first = {m: timed(client, m, inputs[m]) for m in models}  # includes any first swap-in
    rows = []
    for m in models:  # warm: the same model back to back (resident after its first request)
        for _ in range(3):
            timed(client, m, inputs[m])
        before = stat_totals(client, m)
        warm = [timed(client, m, inputs[m]) for _ in range(args.n)]
        split = breakdown(before, stat_totals(client, m), statistics.fmean(warm))
        rows.append({"model": m, "first_ms": first[m], "warm_p50_ms": statistics.median(warm), "warm_p99_ms": pct(warm, 0.99),
                     "warm_mean_ms": statistics.fmean(warm), "warm_split": split})
    alt = {m: [] for m in models}  # alternating: each request may find its model evicted
    for _ in range(args.n):
        for m in models:
            alt[m].append(timed(client, m, inputs[m]))
    for r in rows:
        r["alternating_p50_ms"] = statistics.median(alt[r["model"]])
        r["alternating_p99_ms"] = pct(alt[r["model"]], 0.99)
    stats = {s["name"]: s for s in client.get_inference_statistics()["model_stats"]}
    print(f"{'model':<10} {'first ms':>9} {'warm p50':>9} {'warm p99':>9} {'alt p50':>9} {'alt p99':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['first_ms']:9.2f} {r['warm_p50_ms']:9.2f} {r['warm_p99_ms']:9.2f} "
              f"{r['alternating_p50_ms']:9.2f} {r['alternating_p99_ms']:9.2f}")
        r["memory_usage"] = stats.get(r["model"], {}).get("memory_usage")
    print(f"\nwarm requests, per request (ms; the server's statistics): {'mean':>7} "
          + " ".join(f"{k:>14}" for k in (*STAGES, "outside")))
    for r in rows:
        sp = r["warm_split"]
        print(f"{r['model']:<57} {r['warm_mean_ms']:7.2f} "
              + " ".join(f"{sp[k + '_ms']:14.3f}" for k in (*STAGES, "outside")))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
