"""What forwarding once between nodes costs a request (issue 22): two Torpor nodes on this host,
A on 127.0.0.2 and B on 127.0.0.3, each the other's peer, one CPU virtual device each whose arena
holds one model, host links paced to --pcie GB/s so that a swap-in costs more than a hop. The
model is device-hot on B only; closed-loop clients at each concurrency send the same request
directly to B (the baseline) and to A, which forwards it to B; the difference of the latency
percentiles is what forwarding adds. Rounds alternate the two targets so load from other work on
the machine falls on both alike.

    python loadtest/forward_bench.py                     # HTTP and gRPC, c=1 and c=8
    python loadtest/forward_bench.py -c 8 --requests 4000 --out loadtest/measured/forward-cpu-DATE

Prints a table and writes forward_bench.json (every percentile, the counters that show each
request to A was forwarded and none swapped in there, the machine's load) and the nodes' logs
under --out. Every answer is checked against B's."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from closed_loop import gather_latencies  # loadtest/, this script's own folder

from loadtest.servers import free_port, wait_ready
from tests.models import write_mlps  # after the path is set

HOSTS = ("127.0.0.2", "127.0.0.3")  # A forwards, B holds the model
MARKER = {"torpor-forwarded": "bench"}  # served where it arrives: how the bench places models


class Node:
    def __init__(self, host: str):
        self.host = host
        self.http, self.grpc, self.metrics = (free_port(host) for _ in range(3))
        self.proc: subprocess.Popen | None = None
        self.log = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"

    def start(self, repo: Path, peer: Node | None, args: argparse.Namespace, log: Path,
              memory: str = "10MiB") -> None:
        """`torpor serve` on this node's address: one CPU virtual device whose arena is `memory`,
        host links paced to args.pcie GB/s, `peer` its only peer (None: a node alone)."""
        cmd = [sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(repo),
               "--devices", "cpu", "--device-memory-bytes", memory, "--device-bandwidths", f"pcie={args.pcie}",
               "--http-address", self.host, "--grpc-address", self.host, "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--node-name", self.host]
        if peer is not None:
            cmd += ["--peers", f"http://{peer.http_url}?grpc={peer.grpc_url}", "--peer-poll-interval", "0.5"]
        self.log = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_live(self, timeout: float = 180.0) -> None:
        why = wait_ready(self.proc, f"http://{self.http_url}/v2/health/ready", timeout, 0.2)
        if why is not None:
            raise SystemExit(f"node {self.host} {why}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics}/metrics", timeout=10) as r:
            return r.read().decode()

    def report(self) -> dict:
        with urllib.request.urlopen(f"http://{self.http_url}/v2/torpor/residency", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        if self.log is not None:
            self.log.close()


def metric_total(text: str, prefix: str, having: str = "") -> float:
    """The sum of the samples in Prometheus text `text` whose line starts with `prefix` (a
    family's name, or its name and first labels) and contains `having` (e.g. a label)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and having in line)


def counters(a: Node, b: Node, model: str) -> dict:
    ra, rb = a.report(), b.report()
    fw = {f"{f['protocol']}:{f['outcome']}": f["requests"] for p in ra["forwarding"]["peers"] for f in p["forwards"]}
    swaps = metric_total(a.metrics_text(), f'torpor_swap_ins{{model="{model}"')
    return {"a_forwards": fw, "b_received": rb["forwarding"]["received"], "a_swap_ins": swaps,
            "a_state": ra["models"][f"{model}:1"]["state"], "b_state": rb["models"][f"{model}:1"]["state"],
            "overhead_s": ra["forwarding"]["peers"][0]["overhead_s"]}


def place(a: Node, b: Node, x: np.ndarray, hot: str, other: str) -> np.ndarray:
    """`hot` on B's device, `other` on A's; B's answer for `x`; once A has read B's report."""
    import tritonclient.http as httpclient

    def infer(node: Node, model: str) -> np.ndarray:
        c = httpclient.InferenceServerClient(node.http_url)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return c.infer(model, [inp], headers=MARKER).as_numpy("output")

    want = infer(b, hot)
    infer(a, other)
    epoch = b.report()["epoch"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        peer = a.report()["forwarding"]["peers"][0]
        if peer["up"] and (peer["epoch"] or 0) >= epoch:
            return want
        time.sleep(0.1)
    raise SystemExit("node A never read node B's report")


async def session(protocol: str, urls: dict[str, str], x: np.ndarray, want: np.ndarray, concurrency: int,
                  warmup: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Per target (name -> URL), the latencies (seconds) of `rounds` x `per_round` requests from
    `concurrency` workers, the targets taking turns round by round on one aio client each, so
    that what else runs on the machine falls on all of them alike."""
    if protocol == "http":
        import tritonclient.http.aio as mod
    else:
        import tritonclient.grpc.aio as mod
    inp = mod.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = [mod.InferRequestedOutput("output", binary_data=True)] if protocol == "http" else None
    clients = {target: mod.InferenceServerClient(url) for target, url in urls.items()}

    def one(client):
        async def call() -> float:
            t = time.perf_counter()
            r = await client.infer("mlp0", [inp], outputs=out)
            seconds = time.perf_counter() - t
            if not np.array_equal(r.as_numpy("output"), want):
                raise AssertionError("an answer differs from the hot node's")
            return seconds
        return call

    lat: dict[str, list[float]] = {target: [] for target in urls}
    try:
        for client in clients.values():  # warm-up: connections, the overhead estimate
            await gather_latencies(one(client), concurrency, warmup)
        for _ in range(rounds):
            for target, client in clients.items():
                lat[target] += await gather_latencies(one(client), concurrency, per_round)
    finally:
        for client in clients.values():
            await client.close()
    return lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(a: Node, b: Node, args: argparse.Namespace, x: np.ndarray, want: np.ndarray) -> list[dict]:
    rows = []
    for protocol in args.protocols.split(","):
        for c in (int(v) for v in args.concurrency.split(",")):
            urls = {"direct": b.http_url if protocol == "http" else b.grpc_url,
                    "forwarded": a.http_url if protocol == "http" else a.grpc_url}
            per_round = max(1, args.requests // args.rounds)
            lat = asyncio.run(session(protocol, urls, x, want, c, args.warmup, args.rounds, per_round))
            row = {"protocol": protocol, "concurrency": c, "requests": per_round * args.rounds}
            for target, xs in lat.items():
                row[f"{target}_mean_ms"] = round(sum(xs) / len(xs) * 1e3, 3)
                for q, name in ((0.5, "p50"), (0.99, "p99")):
                    row[f"{target}_{name}_ms"] = round(pct(xs, q) * 1e3, 3)
            for name in ("mean", "p50", "p99"):
                row[f"added_{name}_ms"] = round(row[f"forwarded_{name}_ms"] - row[f"direct_{name}_ms"], 3)
            rows.append(row)
            print(f"  {protocol} c={c}: direct p50 {row['direct_p50_ms']} ms, forwarded p50 "
                  f"{row['forwarded_p50_ms']} ms", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| protocol | c | requests | direct p50 / p99 | forwarded p50 / p99 | added p50 | added p99 | added mean |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['concurrency']} | {r['requests']} | {r['direct_p50_ms']:.2f} / "
                     f"{r['direct_p99_ms']:.2f} ms | {r['forwarded_p50_ms']:.2f} / {r['forwarded_p99_ms']:.2f} ms | "
                     f"{r['added_p50_ms']:+.2f} ms | {r['added_p99_ms']:+.2f} ms | {r['added_mean_ms']:+.2f} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--concurrency", default="1,8", help="closed-loop workers, comma-separated (default 1,8)")
    ap.add_argument("--requests", type=int, default=2000, help="per target, protocol and concurrency (default 2000)")
    ap.add_argument("--rounds", type=int, default=40, help="turns of direct and forwarded (default 40)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--hidden", type=int, default=512, help="MLP width: 512 is ~4.2 MB of weights (default)")
    ap.add_argument("--pcie", type=float, default=0.01,
                    help="host link GB/s the CPU devices are paced to (default 0.01: a ~420 ms swap-in, so that "
                         "forwarding stays the better choice however loaded the machine is: this measures its cost)")
    ap.add_argument("--out", type=Path, default=ROOT / "loadtest" / "measured" / f"forward-cpu-{time.strftime('%Y-%m-%d')}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x = np.linspace(-1, 1, args.hidden, dtype=np.float32).reshape(1, args.hidden)
    a, b = Node(HOSTS[0]), Node(HOSTS[1])
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        repo = write_mlps(Path(tmp), ["mlp0", "mlp1"], 1, args.hidden)
        for node, peer in ((a, b), (b, a)):
            node.start(repo, peer, args, args.out / f"node-{node.host}.log")
            stack.callback(node.stop)
        a.wait_live()
        b.wait_live()
        want = place(a, b, x, "mlp0", "mlp1")
        load0, before = os.getloadavg(), counters(a, b, "mlp0")
        t0 = time.time()
        rows = measure(a, b, args, x, want)
        after, load1 = counters(a, b, "mlp0"), os.getloadavg()
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "started": t0, "rows": rows,
              "hosts": {"forwarding": HOSTS[0], "hot": HOSTS[1]}, "pcie_GBps": args.pcie, "hidden": args.hidden,
              "cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": load1,
              "counters_before": before, "counters_after": after}
    # requests sent to A per protocol: each row's warm-up and its measured ones
    sent = {p: sum(args.warmup + r["requests"] for r in rows if r["protocol"] == p) for p in args.protocols.split(",")}
    result["not_forwarded"] = sum(sent[p] - after["a_forwards"].get(f"{p}:answered", 0)
                                  + before["a_forwards"].get(f"{p}:answered", 0) for p in sent)
    (args.out / "forward_bench.json").write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(f"\nA's forwards: {before['a_forwards']} -> {after['a_forwards']}; mlp0 swap-ins on A: "
          f"{before['a_swap_ins']:.0f} -> {after['a_swap_ins']:.0f}; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    if result["not_forwarded"] or after["a_swap_ins"] != before["a_swap_ins"]:
        print(f"WARNING: A served {result['not_forwarded']} requests itself (it swapped mlp0 in): the forwarded "
              "columns mix forwarded and local answers")
    print(f"written: {args.out / 'forward_bench.json'}")


if __name__ == "__main__":
    main()
