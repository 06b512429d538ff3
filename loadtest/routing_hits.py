"""The routing's hit rate under the paper's trace on two real nodes (issue 22): two Torpor nodes on
this host, A on 127.0.0.2 and B on 127.0.0.3 (forward_bench's `Node`), one CPU virtual device
each whose arena holds --slots of the --functions models (generated 4-layer MLPs, one 2 MiB
block each), host links paced to --pcie GB/s. The client does not know what either node holds:
each request goes to the next node in turn (--pick round-robin; or random), open loop, at the
arrival times of the paper's trace (torpor-trace-samples.npy: --functions rows drawn with
--seed, the authors' prototype's arrival process, `torpor.sim.workload.prototype_arrivals`)
over --minutes of trace compressed --speedup times. The same arrivals are sent to fresh nodes
in each of three runs (--modes): `forward`, two nodes, each the other's peer (forward-once on);
`alone`, two nodes without --peers; `pooled`, one node whose arena holds both nodes' slots (2 x
--slots), every request to it: the two arenas as one cache, about the best forward-once could
reach. The first trace minute warms the nodes up and is not counted.

    python loadtest/routing_hits.py                              # HTTP, 24 functions, 8 per node
    python loadtest/routing_hits.py --seed 2 --protocols http,grpc --out loadtest/measured/routing-hits-DATE

Counted per run, from the nodes' counters (/metrics, differenced around the measured part;
the warm-up's requests are all answered before the first read):
- hit: a request that found its model landed on the device of the node that ran it
  (`torpor_swap_hits`); the others joined a copy in flight (`torpor_swap_joins`: one another
  request started, or the one the scheduler started early for this request) or started one
  (`torpor_swap_misses`). Hit rate = hits / (hits + joins + misses), both nodes together; a
  forwarded request counts where it ran;
- copies: swap-ins (`torpor_swap_ins`) per node, and per 100 requests;
- forwarded: `torpor_forwards{outcome="answered"}`, and forwards that ended served here
  (`failed`, `refused`);
- per request at the client: answered, failed (any error), p50/p99 latency from the scheduled
  arrival; every answer is checked against the first answer its model gave in that run.

Prints a table and writes routing_hits.json (both runs' per-node counters, the load average)
and the nodes' logs under --out."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forward_bench import HOSTS, Node, metric_total  # loadtest/, this script's own folder

from loadtest.e2e import drive  # after the path is set
from loadtest.e2e_report import FAILED, OK, SHED
from tests.models import write_mlps
from torpor.sim.workload import load_trace, prototype_arrivals, trace_counts

BLOCK = 2 * 1024 * 1024  # the arena's block size: each model (hidden <= 256) takes one
COUNTERS = {"hits": "torpor_swap_hits{", "joins": "torpor_swap_joins{", "misses": "torpor_swap_misses{",
            "copies": "torpor_swap_ins{", "evictions": "torpor_swap_evictions{", "forwarded_in": "torpor_forwarded_in{"}


def arrivals(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(wall seconds from the start, function index): --minutes of the trace for --functions
    rows drawn with --seed, the prototype's arrivals, time divided by --speedup."""
    rng = np.random.default_rng(args.seed)
    counts = trace_counts(load_trace(args.trace), args.functions, args.minutes, rng)
    t, f = prototype_arrivals(counts, rng)
    return t / args.speedup, f


class Picker:
    """e2e.drive's client: each request to a node chosen without knowing residency (the next in
    turn, or at random), over the protocol drive gives; every answer checked against the first
    answer its model gave."""

    def __init__(self, nodes: list[Node], protocols: list[str], x: np.ndarray, pick: str, seed: int):
        import tritonclient.grpc.aio as grpc_aio
        import tritonclient.http.aio as http_aio

        self.protocols = protocols
        self.mods = {"http": http_aio, "grpc": grpc_aio}
        self.clients = {(p, i): (http_aio.InferenceServerClient(n.http_url, conn_limit=256) if p == "http"
                                 else grpc_aio.InferenceServerClient(n.grpc_url))
                        for p in protocols for i, n in enumerate(nodes)}
        self.inputs = {}
        for p, mod in self.mods.items():
            inp = mod.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            self.inputs[p] = [inp]
        self.n = len(nodes)
        self.pick = pick
        self.rng = np.random.default_rng(seed + 1000)
        self.sent = 0
        self.to = [0] * self.n  # requests sent to each node
        self.first: dict[str, np.ndarray] = {}

    def node(self) -> int:
        # round robin per protocol turn, so that with two protocols both reach both nodes
        i = (self.sent // len(self.protocols)) % self.n if self.pick == "round-robin" else int(self.rng.integers(self.n))
        self.sent += 1
        self.to[i] += 1
        return i

    async def infer(self, proto: str, model: str, kind: str) -> None:
        client = self.clients[(proto, self.node())]
        if proto == "http":
            out = [self.mods["http"].InferRequestedOutput("output", binary_data=True)]
            r = await client.infer(model, self.inputs[proto], outputs=out)
        else:
            r = await client.infer(model, self.inputs[proto], client_timeout=120.0)
        y = r.as_numpy("output")
        want = self.first.setdefault(model, y)
        if not np.array_equal(y, want):
            raise AssertionError(f"{model}: an answer differs from its first")

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()


def node_counters(node: Node) -> dict:
    text = node.metrics_text()
    c = {k: metric_total(text, prefix) for k, prefix in COUNTERS.items()}
    for outcome in ("answered", "failed", "refused"):
        c[f"forwards_{outcome}"] = metric_total(text, "torpor_forwards{", f'outcome="{outcome}"')
    return c


def delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before[k]) for k in after}


async def replay(nodes: list[Node], args: argparse.Namespace, t: np.ndarray, f: np.ndarray,
                 x: np.ndarray) -> tuple[dict, dict, dict, list[int]]:
    """Warm-up (the first trace minute), the counters, the rest, the counters: (the measured
    part's RunLog, the counters before and after per node, requests sent per node)."""
    names = [f"fn{i}" for i in range(args.functions)]
    kinds = ["mlp"] * args.functions
    client = Picker(nodes, args.protocols.split(","), x, args.pick, args.seed)
    warm = t < 60.0 / args.speedup
    try:
        await drive(client, names, kinds, t[warm], f[warm], args.max_outstanding, 120.0)
        before = {n.host: await asyncio.to_thread(node_counters, n) for n in nodes}
        client.to = [0] * len(nodes)
        log = await drive(client, names, kinds, t[~warm] - t[~warm][0], f[~warm], args.max_outstanding, 120.0)
        after = {n.host: await asyncio.to_thread(node_counters, n) for n in nodes}
    finally:
        await client.close()
    return log, before, after, client.to


def run_mode(mode: str, repo: Path, args: argparse.Namespace, t: np.ndarray, f: np.ndarray, x: np.ndarray) -> dict:
    nodes = [Node(h) for h in (HOSTS[:1] if mode == "pooled" else HOSTS)]
    memory = f"{args.slots * BLOCK * (2 if mode == 'pooled' else 1) // (1024 * 1024)}MiB"
    with ExitStack() as stack:
        for node, peer in zip(nodes, reversed(nodes), strict=True):
            node.start(repo, peer if mode == "forward" else None, args, args.out / f"{mode}-node-{node.host}.log",
                       memory=memory)
            stack.callback(node.stop)
        for node in nodes:
            node.wait_live()
        if mode == "forward":
            wait_peers_up(nodes)
        load0 = os.getloadavg()
        log, before, after, sent_to = asyncio.run(replay(nodes, args, t, f, x))
        load1 = os.getloadavg()
    per_node = {h: delta(before[h], after[h]) for h in before}
    tot = {k: sum(c[k] for c in per_node.values()) for k in next(iter(per_node.values()))}
    ok = log.status == OK
    lat = log.latency[ok]
    ran = tot["hits"] + tot["joins"] + tot["misses"]
    row = {"mode": mode, "requests": int(log.status.size), "answered": int(ok.sum()),
           "failed": int((log.status == FAILED).sum()), "shed": int((log.status == SHED).sum()),
           "other": int((~np.isin(log.status, (OK, FAILED, SHED))).sum()),
           "hits": tot["hits"], "joins": tot["joins"], "misses": tot["misses"], "ran": ran,
           "hit_rate": round(tot["hits"] / ran, 4) if ran else None,
           "copies": {h: c["copies"] for h, c in per_node.items()},
           "copies_per_100": round(100 * tot["copies"] / max(1, int(ok.sum())), 1),
           "forwarded": tot["forwards_answered"], "forward_fallbacks": tot["forwards_failed"] + tot["forwards_refused"],
           "sent_to": {n.host: k for n, k in zip(nodes, sent_to, strict=True)},
           "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
           "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
           "counters": per_node, "errors": log.errors[:20], "loadavg_before": load0, "loadavg_after": load1}
    print(f"  {mode}: {row['answered']}/{row['requests']} answered, hit rate {row['hit_rate']}, forwarded "
          f"{row['forwarded']}, copies {row['copies']}", file=sys.stderr)
    return row


def wait_peers_up(nodes: list[Node], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p["up"] for n in nodes for p in n.report()["forwarding"]["peers"]):
            return
        time.sleep(0.1)
    raise SystemExit("the nodes never read each other's reports")


def table(rows: list[dict]) -> str:
    head = ("| mode | requests | answered | failed | hit rate | hits / joins / misses | forwarded | copies A / B "
            "| copies per 100 | p50 / p99 |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = (r["copies"].get(h, "-") for h in HOSTS)
        hit = f"{100 * r['hit_rate']:.1f}%" if r["hit_rate"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['requests']} | {r['answered']} | {r['failed'] + r['other']} | {hit} | "
                     f"{r['hits']} / {r['joins']} / {r['misses']} | {r['forwarded']} | {a} / {b} | "
                     f"{r['copies_per_100']} | {r['p50_ms']} / {r['p99_ms']} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--functions", type=int, default=24, help="models, one per trace row (default 24)")
    ap.add_argument("--slots", type=int, default=8, help="models each node's device arena holds (default 8)")
    ap.add_argument("--minutes", type=int, default=9, help="trace minutes sent, the first a warm-up (default 9)")
    ap.add_argument("--speedup", type=float, default=6.0, help="trace time / wall time (default 6: 90 s per run)")
    ap.add_argument("--seed", type=int, default=1, help="which trace rows, and the arrivals (default 1)")
    ap.add_argument("--pick", choices=("round-robin", "random"), default="round-robin",
                    help="how the client picks a node for each request (default round-robin)")
    ap.add_argument("--protocols", default="http", help="http, grpc, or http,grpc (alternating) (default http)")
    ap.add_argument("--modes", default="forward,alone,pooled",
                    help="runs, in order, of forward, alone, pooled (default all three)")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width: 256 is ~1 MB, one arena block (default)")
    ap.add_argument("--pcie", type=float, default=0.05,
                    help="host link GB/s the CPU devices are paced to (default 0.05: a ~21 ms copy)")
    ap.add_argument("--max-outstanding", type=int, default=256, help="client's limit; arrivals past it are dropped")
    ap.add_argument("--trace", default=None, help="the trace .npy (default ../shared/data/torpor-trace-samples.npy)")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "loadtest" / "measured" / f"routing-hits-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args()
    if args.hidden > 256 or args.minutes < 2:
        ap.error("--hidden must be <= 256 (one arena block per model) and --minutes >= 2 (one is the warm-up)")
    if not set(args.modes.split(",")) <= {"forward", "alone", "pooled"}:
        ap.error(f"--modes: expected forward, alone or pooled, got {args.modes!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    t, f = arrivals(args)
    x = np.linspace(-1, 1, args.hidden, dtype=np.float32).reshape(1, args.hidden)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_mlps(Path(tmp), [f"fn{i}" for i in range(args.functions)], 1, args.hidden)
        for mode in args.modes.split(","):
            rows.append(run_mode(mode, repo, args, t, f, x))
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows,
              "arrivals": int(t.size), "measured_from_s": 60.0 / args.speedup, "wall_s": float(t[-1]) if t.size else 0,
              "args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    (args.out / "routing_hits.json").write_text(json.dumps(result, indent=1))
    print(table(rows))
    for r in rows:
        if r["ran"] != r["answered"]:
            print(f"NOTE {r['mode']}: the nodes ran {r['ran']} requests (hits + joins + misses), the client had "
                  f"{r['answered']} answered")
        for e in r["errors"]:
            print(f"{r['mode']}: {e}")
    print(f"written: {args.out / 'routing_hits.json'}")


if __name__ == "__main__":
    main()
