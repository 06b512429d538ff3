"""Where answered requests spent their time, and how far the scheduler's prediction was from it,
read from a Triton trace file written by Torpor (`--trace-config level=TIMESTAMPS`,
`triton,file=PATH`, `rate=N`).

    python loadtest/trace_breakdown.py TRACE.json [--json out.json]

Per model class (the model name without a trailing `_NNN`) and whether the request waited for a
copy of its model (`TORPOR_COPY_START` present) or found it resident, the median and 90th
percentile of each interval, in ms:

- place: arrival (`REQUEST_START`) to joining its device's staging queue (`TORPOR_STAGE_START`);
- stage wait: to its turn (`TORPOR_STAGE_END`); a request passed over (its copy would evict a
  model others wait for) waits here;
- memory: to holding the model in device memory (`TORPOR_MEMORY_END`);
- worker queue: to the device's worker starting its run (`TORPOR_EXEC_START`);
- run: to `COMPUTE_END` (a run waits inside for the layer groups of its copy still landing);
- predicted: arrival to `TORPOR_PREDICTED_END`, the scheduler's expected end at placement;
- actual: arrival to `COMPUTE_END`; and actual - predicted.

Only requests with every stamp count (a shed request writes no trace, as in Triton).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

SPANS = (("place", "REQUEST_START", "TORPOR_STAGE_START"), ("stage wait", "TORPOR_STAGE_START", "TORPOR_STAGE_END"),
         ("memory", "TORPOR_STAGE_END", "TORPOR_MEMORY_END"), ("worker queue", "TORPOR_MEMORY_END", "TORPOR_EXEC_START"),
         ("run", "TORPOR_EXEC_START", "COMPUTE_END"), ("predicted", "REQUEST_START", "TORPOR_PREDICTED_END"),
         ("actual", "REQUEST_START", "COMPUTE_END"))
CLASS = re.compile(r"_\d+$")  # mlp_small_004 -> mlp_small


def read(path: Path) -> dict[int, dict]:
    """Trace id -> {"model": name, "stamps": {name: ns}} from Triton's JSON trace records."""
    traces: dict[int, dict] = {}
    for rec in json.loads(path.read_text()):
        t = traces.setdefault(rec["id"], {"model": None, "stamps": {}})
        if "model_name" in rec:
            t["model"] = rec["model_name"]
        for s in rec.get("timestamps", ()):
            t["stamps"][s["name"]] = s["ns"]
    return traces


def breakdown(traces: dict[int, dict]) -> dict[str, dict]:
    rows: dict[str, list[list[float]]] = {}
    needed = {a for _, a, _ in SPANS} | {b for _, _, b in SPANS}
    for t in traces.values():
        s = t["stamps"]
        if t["model"] is None or not needed <= s.keys():
            continue
        cls = CLASS.sub("", t["model"])
        group = f"{cls} {'copy' if 'TORPOR_COPY_START' in s else 'hit'}"
        rows.setdefault(group, []).append([(s[b] - s[a]) / 1e6 for _, a, b in SPANS])
    out = {}
    for group, xs in sorted(rows.items()):
        a = np.array(xs)
        err = a[:, -1] - a[:, -2]
        out[group] = {"requests": len(xs),
                      **{name: {"p50_ms": float(np.median(a[:, i])), "p90_ms": float(np.percentile(a[:, i], 90))}
                         for i, (name, _, _) in enumerate(SPANS)},
                      "actual_minus_predicted": {"p50_ms": float(np.median(err)),
                                                 "p90_ms": float(np.percentile(err, 90))}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = breakdown(read(args.trace))
    if not out:
        print(f"{args.trace}: no answered request with Torpor's stamps (was it written with level=TIMESTAMPS "
              "by a server with --devices?)", file=sys.stderr)
        return 1
    names = [n for n, _, _ in SPANS] + ["actual_minus_predicted"]
    print("ms, p50 / p90 per interval" + "".join(f" | {n}" for n in names))
    for group, r in out.items():
        print(f"{group:<18} n={r['requests']:<6}" + "".join(
            f" | {r[n]['p50_ms']:7.1f} / {r[n]['p90_ms']:7.1f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
